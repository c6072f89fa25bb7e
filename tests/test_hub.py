"""Hub repos against a hub-compatible server on 127.0.0.1: headers by range, cache, pull, errors."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from localllm.errors import HubError, HubUnreachableError
from localllm.hub import HubClient, RemoteFile, RepoRef, group_quants, quant_label
from tests.fake_hub import FakeHub, running_hub
from tests.gguf_factory import LLAMA_7B, write_gguf

LADDER = ["Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "F16"]
REPO = "org/llama-7b-GGUF"


@pytest.fixture(scope="module")
def ladder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("ladder")
    for quant in LADDER:
        write_gguf(folder / f"llama-7b.{quant}.gguf", LLAMA_7B, quant=quant)
    return folder


@pytest.fixture(scope="module")
def model_file(embedded_model_path: Path) -> Path:
    return embedded_model_path


@pytest.fixture
def hub(ladder_dir: Path, model_file: Path) -> Iterator[FakeHub]:
    fake = FakeHub()
    for index, quant in enumerate(LADDER):
        # sparse files: a distinct stand-in sha256 instead of hashing 40 GB of holes
        fake.add(REPO, ladder_dir / f"llama-7b.{quant}.gguf", sha256=f"{index:x}" * 64)
    fake.add("google/gemma-3-270m-GGUF", model_file)
    with running_hub(fake):
        yield fake


def client(hub: FakeHub, tmp_path: Path) -> HubClient:
    return HubClient(endpoint=hub.url, cache_dir=tmp_path / "cache")


def test_quant_labels_and_split_sets() -> None:
    assert quant_label("Llama-3-8B-Instruct-Q4_K_M.gguf") == "Q4_K_M"
    assert quant_label("model.IQ4_XS.gguf") == "IQ4_XS"
    assert quant_label("Q8_0/model-Q8_0-00001-of-00002.gguf") == "Q8_0"
    assert quant_label("x-bf16.gguf") == "BF16"
    files = [RemoteFile(f"big-Q8_0-0000{i}-of-00003.gguf", 10, None) for i in (1, 2, 3)]
    files += [RemoteFile("big-Q4_K_M.gguf", 12, None), RemoteFile("mmproj-F16.gguf", 1, None)]
    quants = group_quants(files)
    assert [(q.label, len(q.files), q.size) for q in quants] == [("Q4_K_M", 1, 12), ("Q8_0", 3, 30)]


def test_fit_reads_headers_only(hub: FakeHub, tmp_path: Path) -> None:
    hub_client = client(hub, tmp_path)
    results = hub_client.read_headers(RepoRef.parse(REPO))
    assert [q.label for q, _ in results] == LADDER
    for quant, header in results:
        assert header.file_type == quant.label
        assert header.n_layer == 32
        assert header.file_bytes == quant.size  # sizes come from the hub, not a download
    ladder_bytes = sum(q.size for q, _ in results)
    assert ladder_bytes > 40e9
    assert hub.total_sent() < 0.01 * ladder_bytes  # less than 1% of the ladder
    assert hub.total_sent() < 7 * 4 * 2**20  # a few MB per quantization
    # every file request was a ranged GET
    file_requests = [r for r in hub.requests if "/resolve/" in r[1]]
    assert file_requests and all(rng is not None for _, _, rng in file_requests)


def test_second_fit_uses_the_cache_and_works_offline(
    hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub_client = client(hub, tmp_path)
    first = hub_client.read_headers(RepoRef.parse(REPO))
    sent = hub.total_sent()
    again = client(hub, tmp_path).read_headers(RepoRef.parse(REPO))
    assert hub.total_sent() == sent  # no header bytes fetched the second time
    assert [h.total_bytes for _, h in again] == [h.total_bytes for _, h in first]
    # the hub goes away: the cache still answers
    offline = HubClient(endpoint="http://127.0.0.1:9", cache_dir=tmp_path / "cache")
    cached = offline.read_headers(RepoRef.parse(REPO))
    assert [q.label for q, _ in cached] == LADDER
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert len(client(hub, tmp_path).read_headers(RepoRef.parse(REPO + ":Q4_K_M"))) == 1


def test_pull_named_quant_verifies_sha(hub: FakeHub, tmp_path: Path, model_file: Path) -> None:
    hub_client = client(hub, tmp_path)
    ref = RepoRef.parse("google/gemma-3-270m-GGUF:Q4_K_M")
    _, quants = hub_client.list_quants(ref)
    seen: list[tuple[int, int]] = []
    path = hub_client.download(
        ref, quants[0], tmp_path / "models", lambda d, t: seen.append((d, t))
    )
    assert path == tmp_path / "models" / model_file.name
    assert _sha256(path) == _sha256(model_file)
    assert seen[-1] == (model_file.stat().st_size, model_file.stat().st_size)
    assert not list((tmp_path / "models").glob("*.partial"))
    # pulling again transfers nothing
    sent = hub.total_sent()
    hub_client.download(ref, quants[0], tmp_path / "models")
    assert hub.total_sent() == sent


def test_interrupted_pull_resumes(hub: FakeHub, tmp_path: Path, model_file: Path) -> None:
    hub_client = client(hub, tmp_path)
    ref = RepoRef.parse("google/gemma-3-270m-GGUF")
    _, quants = hub_client.list_quants(ref)
    size = model_file.stat().st_size
    hub.cut_after[model_file.name] = 100 * 2**20  # the connection drops after 100 MiB
    with pytest.raises(HubError, match="run the same command again to resume"):
        hub_client.download(ref, quants[0], tmp_path / "models")
    partial = tmp_path / "models" / (model_file.name + ".partial")
    assert partial.stat().st_size == 100 * 2**20
    assert not (tmp_path / "models" / model_file.name).exists()  # nothing looks complete
    before = hub.sent_bytes[model_file.name]
    path = hub_client.download(ref, quants[0], tmp_path / "models")
    assert hub.sent_bytes[model_file.name] - before == size - 100 * 2**20  # only the rest
    assert hub.requests[-1][2] == f"bytes={100 * 2**20}-"
    assert _sha256(path) == _sha256(model_file)


def test_corrupt_download_is_removed(hub: FakeHub, tmp_path: Path, model_file: Path) -> None:
    hub.add("org/bad", model_file, sha256="f" * 64)
    hub_client = client(hub, tmp_path)
    ref = RepoRef.parse("org/bad")
    _, quants = hub_client.list_quants(ref)
    with pytest.raises(HubError, match="does not match"):
        hub_client.download(ref, quants[0], tmp_path / "models")
    assert list((tmp_path / "models").iterdir()) == []


def test_full_disk_refused_before_download(hub: FakeHub, tmp_path: Path, model_file: Path) -> None:
    hub.add("org/huge", model_file)
    hub.repos["org/huge"][model_file.name].declared_size = 10**16  # 10 PB
    hub_client = client(hub, tmp_path)
    ref = RepoRef.parse("org/huge")
    _, quants = hub_client.list_quants(ref)
    sent = hub.total_sent()
    with pytest.raises(HubError, match="needs 10000000.0 GB more"):
        hub_client.download(ref, quants[0], tmp_path / "models")
    assert hub.total_sent() == sent
    assert not any((tmp_path / "models").iterdir())


def test_errors_are_one_line_with_advice(hub: FakeHub, tmp_path: Path) -> None:
    hub.gated.add("org/gated")
    hub_client = client(hub, tmp_path)
    with pytest.raises(HubError, match="gated.*HF_TOKEN"):
        hub_client.list_quants(RepoRef.parse("org/gated"))
    with pytest.raises(HubError, match="no such repo"):
        hub_client.list_quants(RepoRef.parse("org/missing"))
    with pytest.raises(HubError, match="has no quantization 'Q1_0'.*Q4_K_M"):
        hub_client.read_headers(RepoRef.parse(REPO + ":Q1_0"))
    down = HubClient(endpoint="http://127.0.0.1:9", cache_dir=tmp_path / "empty")
    with pytest.raises(HubUnreachableError, match="could not reach the hub"):
        down.list_quants(RepoRef.parse(REPO))
    with pytest.raises(HubError, match="not a hub reference"):
        RepoRef.parse("not a repo")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def test_serve_reference_pulls_once(
    hub: FakeHub, tmp_path: Path, model_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from localllm.pull import ensure_local
    from localllm.settings import Settings

    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    settings = Settings(models_dir=tmp_path / "models")
    path = ensure_local("google/gemma-3-270m-GGUF:Q4_K_M", settings)
    assert path == tmp_path / "models" / model_file.name and path.stat().st_size > 0
    sent = hub.total_sent()
    assert ensure_local("google/gemma-3-270m-GGUF:Q4_K_M", settings) == path
    assert hub.total_sent() == sent  # already local: nothing downloaded again
    # a plain local name still resolves without the hub
    assert ensure_local(model_file.stem, settings) == path


def test_serve_reference_fits_the_ladder_once(
    hub: FakeHub, tmp_path: Path, model_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from localllm import pull as pull_module
    from localllm.settings import Settings

    fits: list[int] = []
    real_fit = pull_module._fit_choice

    def counting_fit(headers: list[object], settings: Settings) -> object:
        fits.append(len(headers))
        return real_fit(headers, settings)  # type: ignore[arg-type]

    monkeypatch.setattr(pull_module, "_fit_choice", counting_fit)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    settings = Settings(models_dir=tmp_path / "models")
    path = pull_module.ensure_local("google/gemma-3-270m-GGUF", settings)
    assert path.name == model_file.name and path.stat().st_size == model_file.stat().st_size
    assert fits == [1]  # the choice is made once, then downloaded as chosen
