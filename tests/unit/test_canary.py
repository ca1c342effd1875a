"""Canary analysis over one window of gateway metrics."""

from __future__ import annotations

import pytest

from airloop.steps.rollout.canary import analyse, histogram_quantile

BOUNDS = ["1", "2", "5", "10", "20", "50", "+Inf"]


def _stats(
    requests: int, errors: int = 0, feedback: int = 0, correct: int = 0, latency_ms: float = 3.0
) -> dict:
    """Cumulative predictor metrics with every request in the bucket holding ``latency_ms``."""
    buckets = {le: (requests if le == "+Inf" or float(le) >= latency_ms else 0) for le in BOUNDS}
    return {
        "requests": requests,
        "errors": errors,
        "latency_ms_buckets": buckets,
        "latency_ms_sum": requests * latency_ms,
        "feedback": feedback,
        "feedback_correct": correct,
    }


def _request(champion: dict, challenger: dict, **criteria) -> dict:
    # "before" holds earlier traffic of the champion only: the window must subtract it.
    return {
        "before": {"v3": _stats(1000, 10, 500, 450)},
        "after": {"v3": _add(_stats(1000, 10, 500, 450), champion), "v4": challenger},
        "champion": "v3",
        "challenger": "v4",
        "criteria": criteria,
    }


def _add(a: dict, b: dict) -> dict:
    out = {k: a[k] + b[k] for k in a if k != "latency_ms_buckets"}
    out["latency_ms_buckets"] = {
        le: a["latency_ms_buckets"][le] + b["latency_ms_buckets"][le] for le in BOUNDS
    }
    return out


def test_pass_when_challenger_is_as_good():
    result = analyse(_request(_stats(800, 2, 400, 360), _stats(200, 1, 100, 91)))
    assert result["verdict"] == "pass", result["reasons"]
    assert result["champion"]["requests"] == 800  # the window, not the cumulative count
    assert result["champion"]["accuracy"] == pytest.approx(0.9)
    assert result["challenger"]["error_rate"] == pytest.approx(0.005)
    assert {t["status"] for t in result["tests"].values()} == {"pass"}


def test_fail_on_errors():
    result = analyse(_request(_stats(800, 2, 400, 360), _stats(400, 40, 100, 90)))
    assert result["verdict"] == "fail"
    assert result["tests"]["errors"]["status"] == "fail"
    assert result["tests"]["errors"]["p_value"] < 0.05
    assert any(r.startswith("errors:") for r in result["reasons"])


def test_small_error_difference_within_noise_passes():
    # 3 errors in 200 vs 2 in 800: higher, but not significantly more than 1 point higher.
    result = analyse(_request(_stats(800, 2, 400, 360), _stats(200, 3, 100, 90)))
    assert result["tests"]["errors"]["status"] == "pass"


def test_fail_on_latency():
    result = analyse(_request(_stats(800, 0, 400, 360, latency_ms=3), _stats(200, 0, 100, 90, latency_ms=60)))
    assert result["verdict"] == "fail"
    assert result["tests"]["latency"]["status"] == "fail"
    assert result["tests"]["latency"]["ratio"] > 1.5
    assert result["tests"]["errors"]["status"] == "pass"


def test_fail_on_accuracy():
    result = analyse(_request(_stats(800, 0, 400, 360), _stats(400, 0, 300, 210)))
    assert result["verdict"] == "fail"
    assert result["tests"]["accuracy"]["status"] == "fail"
    assert result["challenger"]["accuracy"] == pytest.approx(0.7)
    assert "accuracy" in " ".join(result["reasons"])


def test_accuracy_drop_within_allowance_passes():
    # 1 point worse with a 2 point allowance: never a failure, however many labels.
    result = analyse(_request(_stats(8000, 0, 4000, 3600), _stats(8000, 0, 4000, 3560)))
    assert result["tests"]["accuracy"]["status"] == "pass"


def test_wait_on_too_few_samples():
    result = analyse(_request(_stats(800, 0, 400, 360), _stats(20, 0, 10, 10)))
    assert result["verdict"] == "wait"
    assert {t["status"] for t in result["tests"].values()} == {"wait"}
    assert result["reasons"]


def test_wait_on_too_little_feedback_even_if_traffic_is_fine():
    result = analyse(_request(_stats(800, 0, 400, 360), _stats(200, 0, 5, 5)))
    assert result["verdict"] == "wait"
    assert result["tests"]["accuracy"]["status"] == "wait"
    assert result["tests"]["errors"]["status"] == "pass"


def test_failure_wins_over_waiting():
    result = analyse(_request(_stats(800, 0, 400, 360), _stats(400, 80, 0, 0)))
    assert result["verdict"] == "fail"


def test_counter_reset_waits():
    request = _request(_stats(800), _stats(200))
    request["after"]["v3"] = _stats(10)  # the gateway restarted: counters below "before"
    result = analyse(request)
    assert result["verdict"] == "wait"
    assert "restarted" in result["reasons"][0]


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="'v9' is not in the 'after' snapshot"):
        analyse({**_request(_stats(100), _stats(100)), "challenger": "v9"})
    with pytest.raises(ValueError, match="unknown canary criteria"):
        analyse(_request(_stats(100), _stats(100), max_latency=2))
    with pytest.raises(ValueError, match="alpha"):
        analyse(_request(_stats(100), _stats(100), alpha=1.5))


def test_histogram_quantile_interpolates_within_a_bucket():
    buckets = {"1": 0, "2": 50, "5": 100, "+Inf": 100}
    assert histogram_quantile(0.5, buckets) == pytest.approx(2.0)
    assert histogram_quantile(0.75, buckets) == pytest.approx(3.5)
    assert histogram_quantile(0.99, {"1": 0, "2": 0, "+Inf": 10}) == 2.0  # beyond the last finite bound
    assert histogram_quantile(0.99, {"1": 0, "+Inf": 0}) is None


def test_latency_jitter_within_the_absolute_slack_passes():
    # five times slower, but only 12 ms: the noise of a short window on a busy machine
    result = analyse(_request(_stats(800, 0, 400, 360, latency_ms=3), _stats(200, 0, 100, 90, latency_ms=15)))
    assert result["tests"]["latency"]["status"] == "pass"
    assert result["verdict"] == "pass"


# -- shadow mode: the diff of two predictors' answers to the same traffic ------------------------------


def _shadow_stats(
    requests: int,
    predicted: dict[str, int],
    pairs: int | None = None,
    agreements: int = 0,
    errors: int = 0,
    latency_ms: float = 3.0,
) -> dict:
    stats = {**_stats(requests, errors, latency_ms=latency_ms), "predicted": predicted}
    if pairs is not None:
        stats.update(pairs=pairs, agreements=agreements)
    return stats


def _shadow(champion: dict, challenger: dict, **criteria) -> dict:
    return {
        "mode": "shadow",
        "before": {},
        "after": {"v3": champion, "v4": challenger},
        "champion": "v3",
        "challenger": "v4",
        "criteria": criteria,
    }


def test_shadow_passes_when_the_answers_agree():
    champion = _shadow_stats(1000, {"0": 520, "1": 480}, pairs=0)
    challenger = _shadow_stats(1000, {"0": 510, "1": 490}, pairs=1000, agreements=960)
    result = analyse(_shadow(champion, challenger))
    assert result["verdict"] == "pass", result["reasons"]
    assert result["mode"] == "shadow" and set(result["tests"]) == {
        "errors",
        "latency",
        "agreement",
        "distribution",
    }
    assert result["challenger"]["agreement"] == pytest.approx(0.96)
    assert result["tests"]["distribution"]["distance"] == pytest.approx(0.01)
    assert "accuracy" not in result["tests"]  # shadow answers reach no client, so no feedback is theirs


def test_shadow_fails_on_low_agreement_even_with_the_same_class_mix():
    # A model answering at random has the champion's class mix but agrees half the time.
    champion = _shadow_stats(1000, {"0": 500, "1": 500}, pairs=0)
    challenger = _shadow_stats(1000, {"0": 500, "1": 500}, pairs=1000, agreements=510)
    result = analyse(_shadow(champion, challenger))
    assert result["verdict"] == "fail"
    assert result["tests"]["agreement"]["status"] == "fail"
    assert result["tests"]["distribution"]["status"] == "pass"
    assert any(r.startswith("agreement: agreement 0.5100") for r in result["reasons"])


def test_shadow_fails_on_a_shifted_output_distribution():
    champion = _shadow_stats(1000, {"0": 500, "1": 500}, pairs=0)
    challenger = _shadow_stats(1000, {"0": 800, "1": 200}, pairs=1000, agreements=900)
    result = analyse(_shadow(champion, challenger, min_agreement=0.5))
    assert result["tests"]["distribution"]["status"] == "fail"
    assert result["tests"]["distribution"]["distance"] == pytest.approx(0.3)
    assert result["tests"]["distribution"]["p_value"] < 1e-6
    assert result["verdict"] == "fail"


def test_shadow_distance_within_noise_passes():
    # 0.12 apart but on 60 rows each: above the limit, not significantly so.
    champion = _shadow_stats(60, {"0": 30, "1": 30}, pairs=0)
    challenger = _shadow_stats(60, {"0": 37, "1": 23}, pairs=60, agreements=55)
    result = analyse(_shadow(champion, challenger, min_requests=50, min_pairs=50))
    assert result["tests"]["distribution"]["distance"] > 0.1
    assert result["tests"]["distribution"]["status"] == "pass"


def test_shadow_fails_on_errors_and_latency_of_the_mirrored_requests():
    champion = _shadow_stats(1000, {"0": 500, "1": 500}, pairs=0)
    failing = _shadow_stats(1000, {"0": 250, "1": 250}, pairs=500, agreements=490, errors=500)
    assert analyse(_shadow(champion, failing))["tests"]["errors"]["status"] == "fail"
    slow = _shadow_stats(1000, {"0": 500, "1": 500}, pairs=1000, agreements=990, latency_ms=60)
    assert analyse(_shadow(champion, slow))["tests"]["latency"]["status"] == "fail"


def test_shadow_waits_for_enough_mirrored_rows():
    champion = _shadow_stats(1000, {"0": 500, "1": 500}, pairs=0)
    challenger = _shadow_stats(60, {"0": 30, "1": 30}, pairs=40, agreements=40)
    result = analyse(_shadow(champion, challenger))
    assert result["verdict"] == "wait"
    assert result["tests"]["agreement"]["status"] == result["tests"]["distribution"]["status"] == "wait"


def test_shadow_without_recorded_pairs_skips_agreement_only():
    # Seldon on Kubernetes: Prometheus knows each predictor's answers, not the pairs.
    champion = _shadow_stats(1000, {"0": 500, "1": 500})
    challenger = _shadow_stats(1000, {"0": 505, "1": 495})
    result = analyse(_shadow(champion, challenger))
    assert result["tests"]["agreement"]["status"] == "skipped"
    assert result["verdict"] == "pass"
    assert result["challenger"]["pairs"] is None


def test_shadow_window_subtracts_before_and_bad_modes_are_named():
    before = {"v4": _shadow_stats(500, {"0": 250, "1": 250}, pairs=500, agreements=250)}
    request = _shadow(
        _shadow_stats(1000, {"0": 500, "1": 500}, pairs=0),
        _shadow_stats(1500, {"0": 750, "1": 750}, pairs=1500, agreements=1250),
    )
    result = analyse({**request, "before": before})
    assert result["challenger"]["pairs"] == 1000 and result["challenger"]["agreement"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="mode must be one of"):
        analyse({**request, "mode": "blue-green"})
    with pytest.raises(ValueError, match="'min_agreement' is a fraction"):
        analyse(_shadow({}, {}, min_agreement=90))


def test_chi2_sf_matches_scipy():
    from scipy.stats import chi2

    from airloop.steps.rollout.canary import chi2_sf

    for dof in (1, 2, 3, 4, 7):
        for x in (0.05, 1.0, 3.84, 12.0, 40.0):
            assert chi2_sf(x, dof) == pytest.approx(chi2.sf(x, dof), rel=1e-9, abs=1e-15)
    assert chi2_sf(5.0, 0) == 1.0


def test_one_slow_request_of_a_small_window_does_not_decide_the_latency_check():
    # 55 challenger requests, one of them 50 ms slower: that one is the window's p99.
    slow = _add(_stats(54, 0, 40, 36, latency_ms=3), _stats(1, latency_ms=45))
    result = analyse(_request(_stats(800, 0, 400, 360, latency_ms=3), slow))
    latency = result["tests"]["latency"]
    assert latency["status"] == "pass" and latency["quantile"] == pytest.approx(1 - 5 / 55)
    assert "55 requests are too few for a p99" in latency["reason"]
    # the same stall in ten of them is a tail the window does show
    slower = _add(_stats(45, 0, 40, 36, latency_ms=3), _stats(10, latency_ms=45))
    assert analyse(_request(_stats(800, 0, 400, 360, latency_ms=3), slower))["tests"]["latency"][
        "status"
    ] == ("fail")
    # with enough requests the check is a p99 again
    assert analyse(_request(_stats(800), _stats(600)))["tests"]["latency"]["quantile"] == 0.99


# -- labels that come late --------------------------------------------------------------------------------

LAGS = ["1", "5", "15", "30", "60", "300", "+Inf"]


def _labelled(stats: dict, lags_s: list[float]) -> dict:
    """``stats`` with ``lags_s``: one labelled request per lag (seconds from prediction to label)."""
    buckets = {le: sum(1 for lag in lags_s if le == "+Inf" or lag <= float(le)) for le in LAGS}
    return {**stats, "labelled": len(lags_s), "label_lag_s_buckets": buckets}


@pytest.mark.parametrize("min_feedback", [30, 0])
def test_no_labels_yet_never_passes_whatever_the_minimum(min_feedback):
    result = analyse(
        _request(_stats(800), _stats(200), min_feedback=min_feedback),
    )
    assert result["verdict"] == "wait"
    assert result["tests"]["accuracy"]["status"] == "wait"
    assert {result["tests"][t]["status"] for t in ("errors", "latency")} == {"pass"}
    assert (result["champion"]["labelled"], result["challenger"]["labelled"]) == (0, 0)


def test_partial_labels_wait_and_say_how_many_came():
    result = analyse(_request(_stats(800, 0, 40, 36), _stats(200, 0, 12, 11)))
    assert result["verdict"] == "wait"
    assert "challenger 12 of 200" in result["tests"]["accuracy"]["reason"]


def test_labels_for_one_arm_only_wait():
    result = analyse(_request(_stats(800, 0, 400, 360), _stats(200)))
    assert result["verdict"] == "wait" and result["tests"]["accuracy"]["status"] == "wait"
    assert "challenger 0 of 200" in result["tests"]["accuracy"]["reason"]


def test_label_lag_is_reported_per_arm_over_the_window():
    before = _labelled(_stats(1000, 10, 500, 450), [0.5] * 100)
    champion_new = [2.0] * 50 + [100.0] * 50  # this window's labels of the champion
    after = _labelled(_add(_stats(1000, 10, 500, 450), _stats(800, 0, 100, 90)), [0.5] * 100 + champion_new)
    challenger = _labelled(_stats(200, 0, 40, 36), [20.0] * 36 + [200.0] * 4)
    result = analyse(
        {
            "before": {"v3": before},
            "after": {"v3": after, "v4": challenger},
            "champion": "v3",
            "challenger": "v4",
        }
    )
    assert result["verdict"] == "pass"
    champion, chal = result["champion"], result["challenger"]
    assert champion["labelled"] == 100 and chal["labelled"] == 40
    # Interpolated within the buckets, as a Prometheus histogram_quantile: 2 s in (1, 5], 100 s in (60, 300].
    assert 1 < champion["label_lag_p50_s"] <= 5 and 60 < champion["label_lag_p90_s"] <= 300
    assert 15 < chal["label_lag_p50_s"] <= 30 and 15 < chal["label_lag_p90_s"] <= 30


def _arm(labelled: int, correct: int) -> dict:
    """One predictor's matured labels from the labels log (``airloop.labels.window_quality``)."""
    return {
        "model_version": "x",
        "labelled": labelled,
        "rows": labelled,
        "correct": correct,
        "accuracy": correct / labelled,
        "label_lag_p50_s": 3600.0,
        "label_lag_p90_s": 7200.0,
    }


def test_labels_from_the_labels_log_judge_quality_whatever_the_counters_saw():
    # The counters saw no feedback in the window (it came after the gateway forgot the predictions).
    request = _request(_stats(800), _stats(200))
    request["labels"] = {"v3": _arm(100, 95), "v4": _arm(100, 60)}
    result = analyse(request)
    assert result["verdict"] == "fail" and result["tests"]["accuracy"]["status"] == "fail"
    assert (result["challenger"]["labelled"], result["challenger"]["accuracy"]) == (100, 0.6)
    assert result["challenger"]["label_lag_p90_s"] == 7200.0
    # The labels log has labels for the champion only: wait, whatever the counters say.
    request = _request(_stats(800, 0, 400, 360), _stats(200, 0, 100, 90))
    request["labels"] = {"v3": _arm(100, 95)}
    result = analyse(request)
    assert result["verdict"] == "wait" and "challenger 0 of 200" in result["tests"]["accuracy"]["reason"]


@pytest.mark.parametrize(
    ("champion", "challenger", "status"),
    [
        (
            {"estimated_accuracy": 0.92, "sampling_error": 0.01},
            {"estimated_accuracy": 0.80, "sampling_error": 0.01},
            "fail",
        ),
        (
            {"estimated_accuracy": 0.92, "sampling_error": 0.01},
            {"estimated_accuracy": 0.86, "sampling_error": 0.01},
            "skipped",
        ),
        (
            {"estimated_accuracy": 0.92, "sampling_error": 0.01},
            {"estimated_accuracy": 0.99, "sampling_error": 0.01},
            "skipped",
        ),
        (
            {"estimated_accuracy": 0.92, "sampling_error": 0.0},
            {"estimated_accuracy": 0.89, "sampling_error": 0.0},
            "fail",
        ),
        ({"estimated_accuracy": 0.92, "sampling_error": 0.01}, None, "skipped"),
        (
            {"estimated_accuracy": None, "sampling_error": None},
            {"estimated_accuracy": 0.5, "sampling_error": 0.01},
            "skipped",
        ),
    ],
    ids=["clearly_worse", "within_three_errors", "better", "exact_and_worse", "no_challenger", "no_estimate"],
)
def test_the_estimated_accuracy_warns_of_a_clearly_worse_challenger_and_never_passes(
    champion, challenger, status
):
    from airloop.steps.rollout.canary import estimated_accuracy_test

    test = estimated_accuracy_test(champion, challenger, {"max_accuracy_drop": 0.02})
    assert test["status"] == status, test
    assert test["status"] != "pass"
    if "sigmas" in test:  # both arms estimated: each with its uncertainty
        assert test["sampling_errors"] == {
            "champion": champion["sampling_error"],
            "challenger": challenger["sampling_error"],
        }
