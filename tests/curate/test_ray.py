"""The same recipe on a Ray cluster (a local head with 2 CPUs, started here, as a real cluster is:
`ray start --head`) keeps exactly what the local executor keeps."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from slimlm.curate import RunOptions, curate
from tests.curate.test_run import RECIPE, _corpus, _kept


@pytest.fixture()
def ray_cluster():
    ray = Path(sys.executable).with_name("ray")
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's unix sockets live under it
    port = 6391
    # a cluster on loopback for this test only: no token authentication (Ray would write a token
    # into ~/.ray and require every client to be configured for it)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    subprocess.run([ray, "start", "--head", "--num-cpus", "2", "--port", str(port), "--temp-dir", temp,
                    "--node-ip-address", "127.0.0.1", "--include-dashboard", "false", "--disable-usage-stats"],
                   check=True, capture_output=True, timeout=120, env=env)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        import ray as ray_api

        if ray_api.is_initialized():
            ray_api.shutdown()
        subprocess.run([ray, "stop", "--force"], capture_output=True, timeout=120, env=env)
        shutil.rmtree(temp, ignore_errors=True)


def test_ray_executor_keeps_what_the_local_one_keeps(tmp_path, ray_cluster):
    _corpus(tmp_path / "in")
    recipe = {**RECIPE, "steps": ["normalize", "exact_dedup", "decontaminate"]}
    local = curate(recipe, [tmp_path / "in"], tmp_path / "local", RunOptions(tasks=2), say=lambda _: None)
    on_ray = curate(recipe, [tmp_path / "in"], tmp_path / "ray",
                    RunOptions(tasks=2, executor="ray", address=ray_cluster), say=lambda _: None)
    assert sorted(r["id"] for r in _kept(tmp_path / "ray")) == sorted(r["id"] for r in _kept(tmp_path / "local"))
    assert on_ray.funnel == local.funnel
    assert on_ray.funnel[1]["removed"] == {"exact_dedup": 1}


def test_synth_on_ray_keeps_what_it_keeps_locally(tmp_path, ray_cluster):
    """`slimlm synth --executor ray`: the teacher's answers deduplicated and decontaminated on the
    cluster give the same training file as on one machine."""
    from slimlm.curate.steps.decontaminate import task_texts
    from slimlm.curate.synth import SynthOptions, synth
    from tests.curate.test_synth import Writer, _topics
    from tests.serve.serve_helpers import serving

    leak = next(t for t in task_texts("humaneval") if len(t.split()) > 40)
    topics = _topics(tmp_path, ["rivers", "volcanoes", "DUP one", "DUP two", "LEAK"])
    runs = {}
    for executor in ("local", "ray"):
        options = SynthOptions(n=5, topics=topics, audiences=["students"], formats=["tutorial"], tokenizer="words",
                               executor=executor, address=ray_cluster if executor == "ray" else None)
        with serving(Writer(humaneval=leak).app()) as url:
            runs[executor] = synth(f"{url}/v1", tmp_path / executor, options, say=lambda _: None)
    assert runs["ray"]["kept"] == runs["local"]["kept"] == 3
    assert runs["ray"]["funnel"] == runs["local"]["funnel"]
    assert sorted((tmp_path / "ray" / "train.jsonl").read_text().splitlines()) == \
        sorted((tmp_path / "local" / "train.jsonl").read_text().splitlines())
