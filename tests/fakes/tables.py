"""A generated customer table with what real tables hold: categorical string columns, an integer-coded
category, missing values in numeric and string columns, and integer labels."""

from __future__ import annotations

import numpy as np
import pandas as pd

# The integer-coded category a spec must declare (by its type it is a number).
DECLARED = "store"
LABEL = "segment"


def customers(rows: int = 1500, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    region = rng.choice(["north", "south", "east", "west"], size=rows)
    plan = rng.choice(["basic", "plus", "pro"], size=rows, p=[0.5, 0.3, 0.2])
    store = rng.integers(1, 6, size=rows)
    tenure = rng.gamma(2.0, 12.0, size=rows)
    spend = rng.normal(50, 15, size=rows)
    score = (
        np.select([region == "north", region == "south"], [1.2, -1.0], 0.0)
        + np.select([plan == "pro", plan == "plus"], [1.5, 0.6], 0.0)
        + 0.8 * (store == 3)
        + 0.03 * (tenure - 24)
        + rng.normal(0, 0.6, size=rows)
    )
    frame = pd.DataFrame(
        {
            "region": region.astype(object),
            "plan": plan.astype(object),
            DECLARED: store,
            "tenure": tenure,
            "spend": spend,
            LABEL: np.digitize(score, np.quantile(score, [0.4, 0.75])),
        }
    )
    for column, share in (("region", 0.08), ("plan", 0.05), ("tenure", 0.1)):
        frame.loc[rng.random(rows) < share, column] = None
    return frame
