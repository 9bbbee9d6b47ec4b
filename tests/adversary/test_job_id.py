"""A coordinator-chosen ``job-id`` cannot break a region's job history (issue 9, finding 8).

A region keys each release as ``<job-id>/<attempt>`` and finds a job's history by the part before
the first '/'. A job id containing '/' therefore matched none of its own releases: every round
looked like the job's first (ε "this run" showed one round, σ was re-planned each round). The
region parses the run config with the same validation, so such a run config is refused there.
"""

from __future__ import annotations

import pytest

from fedpriv.core.config import FedprivConfig, load_app_defaults, resolve_config
from fedpriv.core.errors import ConfigError


@pytest.mark.parametrize("job_id", ["job/1", "a/b/c", "../x", "", "x" * 65, "job 1", "jöb", "-lead", ".hidden", "a\n"])
def test_bad_job_ids_are_refused_in_one_line(job_id):
    if job_id == "":
        assert resolve_config({"job-id": job_id})[1].job_id == ""  # unset: the CLI fills one in
        return
    with pytest.raises(ConfigError) as info:
        resolve_config({"job-id": job_id})
    message = str(info.value)
    assert message.startswith(f"job-id = {job_id!r}: expected") and "\n" not in message
    assert "letters, digits" in message


@pytest.mark.parametrize("job_id", ["job-1", "a", "20261126.run_7", "0f" * 16, "x" * 64])
def test_good_job_ids_are_accepted(job_id):
    assert resolve_config({"job-id": job_id})[1].job_id == job_id


def test_the_region_side_parse_refuses_it_too():
    """What a ClientApp does with the run config it is sent (client/app.py: FedprivConfig.from_run_config)."""
    run_config = {**load_app_defaults(), "job-id": "victim/evil"}
    with pytest.raises(ConfigError, match="job-id = 'victim/evil'"):
        FedprivConfig.from_run_config(run_config)
