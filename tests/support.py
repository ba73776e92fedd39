"""Test support on real parts, also used by the benchmarks: a Milvus Lite server process that can be
stopped and restarted, killing a Serve replica, free ports, polling /healthz, photo bytes."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import ray
from PIL import Image


class LiteServer:
    """A `milvus-lite server` process (gRPC, like a real Milvus) on a fixed port and data dir."""

    def __init__(self, data_dir: str | Path, port: int) -> None:
        self.data_dir = Path(data_dir)
        self.port = port
        self.proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        """What MilvusClient connects to."""
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30) -> None:
        """Start the server and wait until it accepts connections."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        exe = Path(sys.executable).parent / "milvus-lite"
        self.proc = subprocess.Popen(
            [str(exe), "server", "--data-dir", str(self.data_dir), "--host", "127.0.0.1",
             "--port", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"milvus-lite server exited with {self.proc.returncode}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.1)
        raise TimeoutError("milvus-lite server did not start")

    def stop(self, hard: bool = False) -> None:
        """Stop the server (SIGKILL when hard, else SIGTERM) and wait for it to exit."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL if hard else signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def replica_actor_names(app: str, deployment: str) -> list[str]:
    """Names of the live replica actors of a deployment (needs a connected Ray driver)."""
    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["name"].startswith(prefix))


def replica_libraries(app: str, deployment: str) -> list[set[str]]:
    """Per live replica process of a deployment on this machine (found by the process title
    Ray gives an actor's worker, `ray::ServeReplica:<app>:<deployment>`), the files it has
    mapped, shared libraries included."""
    import psutil

    title = f"ServeReplica:{app}:{deployment}"
    mapped = []
    for process in psutil.process_iter(["cmdline"]):
        if any(part.startswith(f"ray::{title}") for part in process.info["cmdline"] or ()):
            with contextlib.suppress(psutil.NoSuchProcess):
                mapped.append({m.path for m in process.memory_maps() if m.path})
    return mapped


def kill_replica(app: str, deployment: str) -> str:
    """Kill one replica of a deployment outright (Serve then starts a replacement)."""
    names = replica_actor_names(app, deployment)
    if not names:
        raise LookupError(f"no replica of {app}/{deployment}")
    ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
    return names[0]


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, products: int = 0, timeout: float = 180,
                 process: subprocess.Popen | None = None) -> dict:
    """Poll /healthz until it is 200 with at least `products` products indexed (the one health
    poll of tests and benchmarks); RuntimeError if `process` (the server) exits first."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the service process exited with {process.returncode}")
        try:
            r = httpx.get(f"{url}/healthz", timeout=10)
            last = r.text
            if r.status_code == 200 and r.json()["products"] >= products:
                return r.json()
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(0.5)
    raise TimeoutError(f"service not healthy in {timeout}s: {last}")


def request_log_entries(serve_logs: Path, request_ids: list[str], timeout: float = 30,
                        app: str = "shopsearch") -> dict[str, dict]:
    """The ingress's request log line (its JSON fields) of each of `request_ids` (Serve's
    x-request-id), from the app's SearchAPI replica logs in `serve_logs` (a Ray session's
    logs/serve), polled until all are there or `timeout` seconds pass; missing ones are absent."""
    deadline = time.monotonic() + timeout
    found: dict[str, dict] = {}
    while True:
        for path in serve_logs.glob(f"replica_{app}_SearchAPI_*.log"):
            for line in path.read_text(errors="ignore").splitlines():
                entry = _request_entry(line)
                if entry is not None and entry.get("request_id") in request_ids:
                    found[entry["request_id"]] = entry
        if len(found) == len(set(request_ids)) or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def _request_entry(line: str) -> dict | None:
    """The fields of the ingress's `request {...}` log line; with Serve's JSON log encoding
    (the shipped configs) that text is the record's `message`."""
    if line.startswith("{"):
        try:
            line = str(json.loads(line).get("message", ""))
        except ValueError:
            return None
    if "request {" not in line:
        return None
    return json.loads(line[line.index("request {") + len("request "):])


def job_photos(folder: Path, n: int = 6) -> Path:
    """A bare folder of the first `n` demo photos named job-0000.jpg, ...: a catalogue for
    `batch_index index --images` whose products are new to a service holding the demo
    catalogue (the same photos as demo-0000..., so they have the same vectors)."""
    from deployments.core.demo import generate_demo_catalog

    photos = folder / "photos"
    generate_demo_catalog(folder / "d", n=n)
    shutil.copytree(folder / "d" / "images", photos)
    for p in photos.iterdir():
        p.rename(photos / p.name.replace("demo-", "job-"))
    return photos


def jpeg_bytes(image: Image.Image, quality: int = 90) -> bytes:
    """Encode an image as JPEG bytes."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def perturbed_checkpoint(path: Path, noise: float = 0.3) -> Path:
    """Write tf_efficientnet_lite0 with the packaged weights, every conv kernel perturbed by
    `noise` x its std: "another model" for rebuild tests (measured at 0.3: the same photo's
    cosine across the two models is about 0.2, while each model finds the photo at ~1.0)."""
    import timm
    import torch

    from deployments.core.encoders import _load_package_weights

    torch.manual_seed(0)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    model.load_state_dict(_load_package_weights(model), strict=True)
    state = model.state_dict()
    for tensor in state.values():
        if tensor.dtype.is_floating_point and tensor.ndim == 4:
            tensor.add_(torch.randn_like(tensor) * tensor.std() * noise)
    torch.save(state, path)
    return path


def write_config(path: Path, settings, app_name: str = "shopsearch") -> Path:
    """A Serve config file holding these settings as its app's args (what the CLI reads);
    write keys are left out (they never go into files)."""
    import yaml

    args = json.loads(settings.model_dump_json(exclude={"auth"}))
    path.write_text(yaml.safe_dump({"applications": [{"name": app_name, "args": args}]}))
    return path


ROOT = Path(__file__).resolve().parents[1]


def job_runtime_env() -> dict:
    """The runtime env of a `ray job submit` of this project, as the README gives it: this
    checkout uploaded as the working dir (without the venv, data and outputs) and this venv's
    Python for the entrypoint's workers (`py_executable`)."""
    return {"working_dir": str(ROOT), "py_executable": sys.executable,
            "excludes": [".venv", "data", ".git", "benchmarks/out", "test-artifacts"]}


def wait_for_job(client, job: str, timeout: float = float("inf"), poll_s: float = 0.2):
    """The job's final JobStatus (SUCCEEDED, FAILED or STOPPED), polled every `poll_s`;
    TimeoutError after `timeout` seconds."""
    from ray.job_submission import JobStatus

    deadline = time.monotonic() + timeout
    while (status := client.get_job_status(job)) not in (
            JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job} still {status} after {timeout} s")
        time.sleep(poll_s)
    return status


def submit_when_ready(client, timeout: float = 120, **job) -> str:
    """`JobSubmissionClient.submit_job`, retried while the job server has no agent yet (right
    after a cluster starts it answers 500 "No available agent to submit job"), up to `timeout`
    seconds. A fixed submission_id keeps a retry from starting the job twice."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return client.submit_job(**job)
        except RuntimeError as exc:
            text = str(exc)
            if "already exists" in text and job.get("submission_id"):
                return job["submission_id"]  # an earlier try got through after all
            if "No available agent" not in text or time.monotonic() > deadline:
                raise
            time.sleep(1)
