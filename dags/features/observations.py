"""The reference feature repo: the reference data set's features f0..f7, one observation per entity.

``airloop_features`` applies it (the ``feast_default`` connection, or the embedded Feast store under
AIRLOOP_HOME); ``airloop_loop`` with ``source=feast`` joins the ``training`` service onto entity
rows that carry ``observation_id``, ``event_timestamp`` and ``label``.
"""

from datetime import timedelta

from feast import Entity, FeatureService, FeatureView, Field, FileSource, ValueType
from feast.types import Float64

from airloop import settings
from airloop.embedded.demo import FEATURES
from airloop.steps.data.features import REFERENCE_ENTITY, REFERENCE_FEATURES, TIMESTAMP

observation = Entity(
    name="observation",
    join_keys=[REFERENCE_ENTITY],
    value_type=ValueType.INT64,
    description="one row of the reference data set",
)

observations_source = FileSource(
    name="observations",
    path=str(settings.feast_dir() / REFERENCE_FEATURES),
    timestamp_field=TIMESTAMP,
)

observations = FeatureView(
    name="observations",
    entities=[observation],
    # A label joins the features of its observation only if they were known at most a day before it.
    ttl=timedelta(days=1),
    schema=[Field(name=name, dtype=Float64) for name in FEATURES],
    source=observations_source,
    online=True,
)

training = FeatureService(
    name="training", features=[observations], description="the model's features, in the model's order"
)
