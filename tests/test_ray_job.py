"""`ray job submit` of the real CLI against a real head node started with `ray start --head`.

This is the README's cluster path end to end: the job API uploads the repository as the job's
``working_dir`` (as ``ray job submit --working-dir .`` does), the job runs
``python -m mmer_dist.cli merge --backend ray --address auto``, its shard actors run on the head,
and the store gets a new version equal to a local merge.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import tempfile
import time
import shutil

import psutil
import pytest

from mmer_dist.cli import build_parser
from mmer_dist.store.store import Store
from ray_helpers import (  # noqa: F401  (ray_env is a fixture)
    MODELS, REPO, VENV_BIN, assert_ray_details, assert_same_version, free_port, fresh_store, ray_env,
    reference_url, subprocess_env, template_dir,
)

pytestmark = pytest.mark.slow

# What the job's working_dir upload leaves out (besides .gitignore'd paths, which Ray skips too).
UPLOAD_EXCLUDES = [".git", ".venv", "bench/out", "bench/.venvs", ".hypothesis", ".pytest_cache", "**/__pycache__",
                   "*.egg-info"]


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    return template_dir(tmp_path_factory)


@contextlib.contextmanager
def ray_head(num_cpus: int = 2):
    """`ray start --head --block` in its own session; yields the dashboard (job API) URL.

    Teardown ends only what this head started: SIGINT to `ray start` (its atexit handler stops
    the node's processes), then SIGKILL to any recorded descendant still alive. (`ray stop
    --force` would also kill every other Ray instance of this user on the machine.)"""
    # every port of its own: the job agent's default HTTP port (52365) is taken by any other Ray
    # running here (another test worker's cluster), and a head without its agent takes no jobs
    dashboard_port, gcs_port, agent_port = free_port(), free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="mmer-ray-")  # short: Ray's unix socket paths live under it
    log = open(f"{temp_dir}/ray-start.log", "wb")
    cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block", f"--num-cpus={num_cpus}", "--num-gpus=0",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}", f"--port={gcs_port}",
           f"--dashboard-agent-listen-port={agent_port}",
           f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    proc = subprocess.Popen(cmd, env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    head = psutil.Process(proc.pid)
    seen: dict[int, psutil.Process] = {}

    def remember() -> None:
        with contextlib.suppress(psutil.Error):
            for p in head.children(recursive=True):
                seen.setdefault(p.pid, p)

    try:
        url = f"http://127.0.0.1:{dashboard_port}"
        wait_for_job_api(url, proc, temp_dir)
        remember()
        yield url, remember
    finally:
        remember()
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        for p in seen.values():
            with contextlib.suppress(psutil.Error):
                if p.is_running():
                    p.kill()
        psutil.wait_procs(list(seen.values()), timeout=10)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def wait_for_job_api(url: str, proc: subprocess.Popen, temp_dir: str, timeout: float = 120) -> None:
    from ray.job_submission import JobSubmissionClient

    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"`ray start --head` exited with {proc.returncode}:\n"
                               + open(f"{temp_dir}/ray-start.log", errors="replace").read()[-4000:])
        try:
            JobSubmissionClient(url).list_jobs()
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def test_ray_job_submit_runs_the_cli_merge(ray_env, template, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    url = fresh_store(template, tmp_path / "store")
    argv = ["merge", "--store", url, "--backend", "ray", "--address", "auto", "--workers", "2", "--quiet"]
    args = build_parser().parse_args(argv)  # the entrypoint is the real CLI, flags and all
    assert (args.command, args.backend, args.address, args.workers) == ("merge", "ray", "auto", 2)

    with ray_head() as (api, remember):
        client = JobSubmissionClient(api)
        job = client.submit_job(
            entrypoint=f"python -m mmer_dist.cli {' '.join(argv)}",
            runtime_env={"working_dir": str(REPO), "excludes": UPLOAD_EXCLUDES},
        )
        deadline = time.monotonic() + 240
        status = client.get_job_status(job)
        while status not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
            assert time.monotonic() < deadline, f"job still {status}:\n{client.get_job_logs(job)[-4000:]}"
            remember()
            time.sleep(0.5)
            status = client.get_job_status(job)
        logs = client.get_job_logs(job)
        info = client.get_job_info(job)
    assert status == JobStatus.SUCCEEDED, f"{status}: {info.message}\n{logs[-6000:]}"
    assert "published version 1" in logs and "(ray)" in logs, logs[-3000:]

    catalog = Store.open(url).catalog()
    record = catalog.latest_version()
    assert record is not None and record.version == 1
    assert record.models == [m[0] for m in MODELS]
    assert_ray_details(record, n_shards=2)
    assert_same_version(url, reference_url(template))

