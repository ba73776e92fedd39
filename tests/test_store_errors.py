"""Every Milvus client failure leaves the store as BackendUnavailable (the API answers 503), in
every public ProductStore method: unit tests with a client that raises each kind of error, and a
real Milvus Lite server process stopped and asked with deadlines too short to meet."""

from __future__ import annotations

import pickle
import signal
import time
from pathlib import Path

import grpc
import grpc.aio
import numpy as np
import pymilvus
import pytest
from pymilvus import MilvusException
from pymilvus.exceptions import ConnectionNotExistException, MilvusUnavailableException, ParamError

from deployments.core.errors import BackendUnavailable, InvalidInput
from deployments.core.products import Product
from deployments.core.settings import MilvusSettings
from deployments.core.store import Hit, ProductStore, client_failure
from tests.support import LiteServer, free_port

IMAGE_DIM, TEXT_DIM = 16, 8


class _RawRpcError(grpc.RpcError, grpc.Call):
    """What pymilvus lets escape on a missed deadline: a finished gRPC call, not wrapped."""

    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return "Deadline Exceeded /home/someone/secret/path.py"

    def initial_metadata(self):
        return None

    def trailing_metadata(self):
        return None

    def is_active(self) -> bool:
        return False

    def time_remaining(self):
        return None

    def cancel(self) -> bool:
        return False

    def add_callback(self, callback) -> bool:
        return False


def _raised_inside_pymilvus() -> Exception:
    """A plain KeyError raised from a frame in pymilvus's own directory (a client bug)."""
    path = str(Path(pymilvus.__file__).parent / "fake_client_module.py")
    try:
        exec(compile("raise KeyError('segment')", path, "exec"))  # noqa: S102
    except KeyError as exc:
        return exc
    raise AssertionError("unreachable")


CLIENT_ERRORS = {
    "milvus": lambda: MilvusException(code=2, message="server unavailable"),
    "milvus-subclass": lambda: ConnectionNotExistException(message="no connection"),
    "milvus-unavailable": lambda: MilvusUnavailableException(message="down"),
    "param": lambda: ParamError(message="bad param"),
    "grpc-deadline": lambda: _RawRpcError(grpc.StatusCode.DEADLINE_EXCEEDED),
    "grpc-unavailable": lambda: _RawRpcError(grpc.StatusCode.UNAVAILABLE),
    "grpc-bare": lambda: grpc.RpcError("bare"),
    "grpc-aio": lambda: grpc.aio.AioRpcError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                             grpc.aio.Metadata(), grpc.aio.Metadata(),
                                             "Deadline Exceeded"),
    "grpc-future-timeout": lambda: grpc.FutureTimeoutError(),
    "connection": lambda: ConnectionResetError("reset by peer"),
    "timeout": lambda: TimeoutError("timed out"),
    "inside-pymilvus": _raised_inside_pymilvus,
}

_V = np.ones(IMAGE_DIM, np.float32) / 4
_T = np.ones(TEXT_DIM, np.float32) / np.sqrt(TEXT_DIM)
_P = Product(id="p1", title="A product")
# Every public ProductStore method, with arguments that reach the client.
CALLS = {
    "ensure_collection": lambda s: s.ensure_collection(IMAGE_DIM, TEXT_DIM),
    "exists": lambda s: s.exists(),
    "drop": lambda s: s.drop(),
    "ping": lambda s: s.ping(),
    "close": lambda s: s.close(),
    "upsert": lambda s: s.upsert([_P], _V[None], _T[None]),
    "flush": lambda s: s.flush(),
    "delete": lambda s: s.delete(["p1"]),
    "get": lambda s: s.get(["p1"]),
    "get_vectors": lambda s: s.get_vectors("p1"),
    "fingerprints": lambda s: s.fingerprints(),
    "fingerprints/ids": lambda s: s.fingerprints(["p1"]),
    "list": lambda s: s.list(),
    "attribute_counts": lambda s: s.attribute_counts(),
    "vectors_and_labels": lambda s: s.vectors_and_labels(),
    "vectors": lambda s: s.vectors("image"),
    "all_products": lambda s: s.all_products(),
    "collections": lambda s: s.collections(),
    "provenance": lambda s: s.provenance(),
    "alias_target": lambda s: s.alias_target(),
    "point_alias": lambda s: s.point_alias("t__v2"),
    "drop_alias": lambda s: s.drop_alias(),
    "drop_collection": lambda s: s.drop_collection("t__v1"),
    "create_version": lambda s: s.create_version("t__v2", 8, 4, "{}"),
    "for_collection": lambda s: s.for_collection("t__v2").count(),
    "count": lambda s: s.count(),
    "search": lambda s: s.search(_V, "image", 5),
    "search_batch": lambda s: s.search_batch(_V[None], "image", 5),
    "search/colour": lambda s: s.search(_V, "image", 5, with_colour=True),
    "search_pool": lambda s: s.search_pool(_V, "image", 200),
    "complete": lambda s: s.complete([Hit(_P, 1.0)]),
    "hybrid_search": lambda s: s.hybrid_search(_V, _T, 5),
    "text_and_photo_search": lambda s: s.text_and_photo_search(_T, 5),
    "text_and_photo_search/lean": lambda s: s.text_and_photo_search(_T, 5, fields=["colour"]),
    "image_features": lambda s: s.image_features(["p1"]),
    "annotate": lambda s: s.annotate(
        lambda image, colour: (np.zeros((len(image), TEXT_DIM), np.float32), [{}] * len(image)),
        "v1"),
}


class _FailingClient:
    """Every client call raises a fresh exception from `make`."""

    def __init__(self, make) -> None:
        self._make = make

    def __getattr__(self, name: str):
        def fail(*args, **kwargs):
            raise self._make()
        return fail


def _store_with(client, monkeypatch, tmp_path) -> ProductStore:
    monkeypatch.setattr(ProductStore, "_connect", lambda self: client)
    return ProductStore(MilvusSettings(uri=str(tmp_path / "m.db"), collection="t"))


def test_public_methods_are_all_exercised():
    public = {name for name in vars(ProductStore) if not name.startswith("_")
              and callable(getattr(ProductStore, name))}
    assert public <= {c.split("/")[0] for c in CALLS}, public


@pytest.mark.parametrize("error", CLIENT_ERRORS)
@pytest.mark.parametrize("call", CALLS)
def test_every_client_error_becomes_backend_unavailable(error, call, monkeypatch, tmp_path):
    store = _store_with(_FailingClient(CLIENT_ERRORS[error]), monkeypatch, tmp_path)
    with pytest.raises(BackendUnavailable) as caught:
        CALLS[call](store)
    # It crosses Ray (pickled) as itself, without the client's text, paths or traces.
    copy = pickle.loads(pickle.dumps(caught.value))
    assert type(copy) is BackendUnavailable and copy.code == "backend_unavailable"
    assert "/home/" not in copy.message


def test_connecting_fails_as_backend_unavailable(monkeypatch, tmp_path):
    def refuse(*args, **kwargs):
        raise _RawRpcError(grpc.StatusCode.UNAVAILABLE)
    monkeypatch.setattr("deployments.core.store.MilvusClient", refuse)
    with pytest.raises(BackendUnavailable):
        ProductStore(MilvusSettings(uri="http://127.0.0.1:1", collection="t"))


def test_own_errors_are_not_mistaken_for_client_errors(monkeypatch, tmp_path):
    store = _store_with(_FailingClient(lambda: AssertionError("not called")), monkeypatch,
                        tmp_path)
    with pytest.raises(ValueError):
        store.upsert([_P], _V[None], np.ones((2, TEXT_DIM), np.float32))
    assert not client_failure(ValueError("ours"))
    assert not client_failure(InvalidInput("ours"))
    assert client_failure(_raised_inside_pymilvus())


# -- a real Milvus server process --------------------------------------------------------------
@pytest.fixture(scope="module")
def lite_server(tmp_path_factory):
    server = LiteServer(tmp_path_factory.mktemp("milvus-errors"), free_port())
    server.start()
    yield server
    server.stop()


def _server_store(server: LiteServer, **overrides) -> ProductStore:
    settings = MilvusSettings(uri=server.uri, collection="errors", index_type="FLAT",
                              index_params={}, **overrides)
    store = ProductStore(settings)
    store.ensure_collection(IMAGE_DIM, TEXT_DIM)
    return store


READS = ("ping", "exists", "get", "get_vectors", "fingerprints/ids", "list", "count",
         "search", "search/colour", "search_pool", "complete", "search_batch", "hybrid_search")


def test_missed_deadlines_are_backend_unavailable(lite_server):
    """A server that stops answering (paused with SIGSTOP) makes every call miss its deadline:
    gRPC DEADLINE_EXCEEDED, which pymilvus lets escape raw. (A 1 µs budget against a live
    server was tried first: gRPC then meets or misses it by chance, call by call.)"""
    _server_store(lite_server).close()  # the collection exists, with one product
    store = _server_store(lite_server, read_timeout_s=0.3, timeout_s=0.3)
    store.upsert([_P], _V[None], _T[None])
    store.flush()
    lite_server.proc.send_signal(signal.SIGSTOP)
    try:
        messages, answered = {}, []
        for call in (*READS, "upsert", "flush", "delete"):
            start = time.monotonic()
            try:
                CALLS[call](store)
            except BackendUnavailable as exc:
                messages[call] = (exc.message, round(time.monotonic() - start, 2))
            else:
                answered.append(call)  # named below: which call got past a paused server
        assert not answered, f"answered by a paused server: {answered}; {messages}"
        assert "DEADLINE_EXCEEDED" in messages["ping"][0], messages
    finally:
        lite_server.proc.send_signal(signal.SIGCONT)
    deadline = time.monotonic() + 20  # the same store works again once the server answers
    while True:
        try:
            assert store.get(["p1"])
            break
        except BackendUnavailable:
            assert time.monotonic() < deadline, "the store did not recover"
            time.sleep(0.2)
    store.close()


def test_a_stopped_server_is_backend_unavailable_in_every_method(lite_server):
    store = _server_store(lite_server, read_timeout_s=1, timeout_s=1)
    store.upsert([_P], _V[None], _T[None])
    store.flush()
    lite_server.stop(hard=True)
    try:
        for call in CALLS:
            if call != "close":
                with pytest.raises(BackendUnavailable):
                    CALLS[call](store)
        with pytest.raises(BackendUnavailable):
            _server_store(lite_server, read_timeout_s=1, timeout_s=1)
    finally:
        lite_server.start()
    store.close()
