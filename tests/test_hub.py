"""Hub repos against a hub-compatible server on 127.0.0.1: headers by range, cache, pull, errors."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from localllm.errors import HubError, HubUnreachableError
from localllm.hub import (
    HubClient,
    RemoteFile,
    RepoRef,
    group_quants,
    looks_like_repo,
    quant_label,
    select_quant,
)
from localllm.models import model_stem
from tests.fake_hub import (
    COMMIT,
    FakeHub,
    publish_like_mradermacher,
    publish_like_unsloth,
    running_hub,
)
from tests.gguf_factory import LLAMA_7B, scaled, write_gguf

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


# ---------------------------------------------------------------------------------------------
# Hub names as users type them: publishers' file names, addresses, the Hugging Face cache

TINY = scaled(LLAMA_7B, n_layer=4, n_embd=512, n_head=8, n_head_kv=8, n_ff=1024, n_vocab=2048)
UNSLOTH = "unsloth/Model-GGUF"
IMATRIX = "mradermacher/Model-i1-GGUF"


@pytest.fixture
def publishers(tmp_path: Path) -> Iterator[FakeHub]:
    fake = FakeHub()
    publish_like_unsloth(fake, UNSLOTH, tmp_path / "unsloth", TINY)
    publish_like_mradermacher(fake, IMATRIX, tmp_path / "mradermacher", TINY)
    with running_hub(fake):
        yield fake


def test_labels_follow_publishers_names() -> None:
    cases = {
        "Qwen3-30B-A3B-UD-Q4_K_XL.gguf": "UD-Q4_K_XL",
        "Qwen3-30B-A3B-UD-Q2_K_XL.gguf": "UD-Q2_K_XL",
        "Qwen3-30B-A3B-Q2_K.gguf": "Q2_K",
        "UD-Q2_K_XL/DeepSeek-R1-UD-Q2_K_XL-00001-of-00005.gguf": "UD-Q2_K_XL",
        "DeepSeek-R1-UD-IQ1_S-00002-of-00003.gguf": "UD-IQ1_S",
        "Model.i1-Q4_K_M.gguf": "i1-Q4_K_M",
        "Model.i1-IQ4_XS.gguf": "i1-IQ4_XS",
        "Model.IQ4_XS.gguf": "IQ4_XS",
        "Meta-Llama-3.1-8B-Instruct-Q4_K_L.gguf": "Q4_K_L",
        "phi-3-mini-q4_0_4_4.gguf": "Q4_0_4_4",
        "gpt-oss-20b-MXFP4.gguf": "MXFP4",
        "model-bf16.gguf": "BF16",
        "model-f16.gguf": "F16",
        "model-q4_k_m.gguf": "Q4_K_M",  # llama.cpp upper-cases the tag too
        "no-quant-here.gguf": "no-quant-here",
    }
    assert {name: quant_label(name) for name in cases} == cases
    assert model_stem("Model.i1-Q4_K_M.gguf") == model_stem("model-Q8_0-00001-of-00002.gguf")


def test_unsloth_repo_labels_and_order(publishers: FakeHub, tmp_path: Path) -> None:
    from localllm.models import ladder_labels

    results = client(publishers, tmp_path).read_headers(RepoRef.parse(UNSLOTH))
    labels = {q.label: q for q, _ in results}
    # UD-Q2_K_XL no longer collides with Q2_K; sidecars are not models; a split set is one quant
    assert set(labels) == {"Q2_K", "UD-Q2_K_XL", "IQ4_XS", "Q4_K_M", "UD-Q4_K_XL", "Q8_0"}
    assert [f.filename for f in labels["Q8_0"].files] == [
        f"Q8_0/Model-Q8_0-0000{i}-of-00003.gguf" for i in (1, 2, 3)
    ]
    # the fitter's ladder orders by bits per weight from the headers: the labels stay sensible
    headers = [header for _, header in results]
    by_label = ladder_labels(headers)
    ordered = sorted(headers, key=lambda h: h.bits_per_weight, reverse=True)
    assert [by_label[h.path] for h in ordered] == [
        "Q8_0",
        "UD-Q4_K_XL",
        "Q4_K_M",
        "IQ4_XS",
        "UD-Q2_K_XL",
        "Q2_K",
    ]
    split_header = next(h for q, h in results if q.label == "Q8_0")
    assert len(split_header.paths) == 3 and split_header.file_type == "Q8_0"


def test_quant_selection_as_llama_cpp_does_it(publishers: FakeHub, tmp_path: Path) -> None:
    hub_client = client(publishers, tmp_path)
    _, quants = hub_client.list_quants(RepoRef.parse(UNSLOTH))
    picks = {
        "UD-Q4_K_XL": "Model-UD-Q4_K_XL.gguf",
        "ud-q4_k_xl": "Model-UD-Q4_K_XL.gguf",  # any case
        "Q4_K_XL": "Model-UD-Q4_K_XL.gguf",  # llama.cpp's QUANT[.-] match in the file name
        "Q2_K": "Model-Q2_K.gguf",  # never the UD-Q2_K_XL file
        "UD-Q2_K_XL": "Model-UD-Q2_K_XL.gguf",
        "iq4_xs": "Model-IQ4_XS.gguf",
        "Q8_0": "Q8_0/Model-Q8_0-00001-of-00003.gguf",
    }
    chosen = {label: select_quant(quants, label, UNSLOTH).files[0].filename for label in picks}
    assert chosen == picks
    with pytest.raises(HubError, match="has no quantization 'Q5_K_M'.*UD-Q4_K_XL"):
        select_quant(quants, "Q5_K_M", UNSLOTH)
    # the imatrix repo: `:Q4_K_M` finds Model.i1-Q4_K_M.gguf, as with llama.cpp's -hf
    _, imatrix = hub_client.list_quants(RepoRef.parse(IMATRIX))
    assert sorted(q.label for q in imatrix) == ["i1-IQ4_XS", "i1-Q4_K_M", "i1-Q6_K"]
    for label in ("Q4_K_M", "i1-Q4_K_M", "I1-q4_k_m"):
        assert select_quant(imatrix, label, IMATRIX).label == "i1-Q4_K_M"


def test_two_models_in_one_repo_get_distinct_labels() -> None:
    files = [RemoteFile(name, 10, None) for name in ("a-7b-Q4_K_M.gguf", "a-13b-Q4_K_M.gguf")]
    quants = group_quants(files)
    assert sorted(q.label for q in quants) == ["a-13b-Q4_K_M", "a-7b-Q4_K_M"]
    with pytest.raises(HubError, match="matches several files"):
        select_quant(quants, "Q4_K_M", "org/a")
    assert select_quant(quants, "a-7b-Q4_K_M", "org/a").files[0].filename == "a-7b-Q4_K_M.gguf"


def test_pull_unsloth_dynamic_and_split_quants(
    publishers: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from localllm.pull import list_models, pull
    from localllm.settings import Settings

    monkeypatch.setenv("HF_ENDPOINT", publishers.url)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    models = tmp_path / "models"
    settings = Settings(models_dir=models)
    path = pull(f"{UNSLOTH}:UD-Q4_K_XL", settings, progress=False)  # "has no quantization" before
    assert path == models / "Model-UD-Q4_K_XL.gguf"
    assert path.stat().st_size == (tmp_path / "unsloth" / "Model-UD-Q4_K_XL.gguf").stat().st_size
    first = pull(f"hf.co/{UNSLOTH}:q8_0", settings, progress=False)
    assert first == models / "Model-Q8_0-00001-of-00003.gguf"
    assert sorted(p.name for p in models.glob("Model-Q8_0-*")) == [
        f"Model-Q8_0-0000{i}-of-00003.gguf" for i in (1, 2, 3)
    ]
    assert _sha256(models / "Model-Q8_0-00002-of-00003.gguf") == _sha256(
        tmp_path / "unsloth" / "Q8_0" / "Model-Q8_0-00002-of-00003.gguf"
    )
    # `models` shows the quantization the file name gives, not the type the GGUF declares
    listed = {Path(m.path).name: m.quant for m in list_models(settings) if not m.embedded}
    assert listed == {"Model-UD-Q4_K_XL.gguf": "UD-Q4_K_XL", first.name: "Q8_0"}


def test_references_as_users_type_them() -> None:
    cases = {
        "org/repo": RepoRef("org/repo"),
        "org/repo:Q4_K_M": RepoRef("org/repo", "Q4_K_M"),
        "hf.co/org/repo:UD-Q4_K_XL": RepoRef("org/repo", "UD-Q4_K_XL"),
        "hf.co/org/repo:latest": RepoRef("org/repo"),  # Ollama's default tag: the fitter chooses
        "huggingface.co/org/repo": RepoRef("org/repo"),
        "https://huggingface.co/org/repo": RepoRef("org/repo"),
        "https://huggingface.co/org/repo/": RepoRef("org/repo"),
        "https://hf.co/org/repo:Q8_0": RepoRef("org/repo", "Q8_0"),
        "https://huggingface.co/org/repo/tree/main": RepoRef("org/repo"),
        "https://huggingface.co/org/repo/tree/v2": RepoRef("org/repo", revision="v2"),
        "https://huggingface.co/org/repo/blob/main/Q8_0/m-Q8_0-00001-of-00002.gguf": RepoRef(
            "org/repo", filename="Q8_0/m-Q8_0-00001-of-00002.gguf"
        ),
        "https://huggingface.co/org/repo/resolve/main/m-Q4_K_M.gguf?download=true": RepoRef(
            "org/repo", filename="m-Q4_K_M.gguf"
        ),
    }
    assert {text: RepoRef.parse(text) for text in cases} == cases
    for bad in ("https://huggingface.co/org", "https://huggingface.co/org/repo/discussions/1"):
        with pytest.raises(HubError, match="not a hub reference"):
            RepoRef.parse(bad)


def test_addresses_read_what_they_name(publishers: FakeHub, tmp_path: Path) -> None:
    hub_client = client(publishers, tmp_path)
    blob = f"https://huggingface.co/{UNSLOTH}/blob/main/Q8_0/Model-Q8_0-00002-of-00003.gguf"
    [(quant, header)] = hub_client.read_headers(RepoRef.parse(blob))
    assert quant.label == "Q8_0" and len(header.paths) == 3
    [(quant, _)] = hub_client.read_headers(RepoRef.parse(f"hf.co/{UNSLOTH}:UD-Q2_K_XL"))
    assert quant.files[0].filename == "Model-UD-Q2_K_XL.gguf"
    whole = hub_client.read_headers(RepoRef.parse(f"https://huggingface.co/{UNSLOTH}/tree/main"))
    assert len(whole) == 6
    with pytest.raises(HubError, match="no model file 'nope.gguf'"):
        hub_client.read_headers(
            RepoRef.parse(f"https://huggingface.co/{UNSLOTH}/blob/main/nope.gguf")
        )


def test_paths_are_not_hub_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    assert looks_like_repo("org/repo") and looks_like_repo("org/repo:Q4_K_M")
    assert looks_like_repo("hf.co/org/repo") and looks_like_repo("https://huggingface.co/o/r")
    for path_like in ("models/qwen", "models/qwen:Q4_K_M", "org/model.gguf", "./org/repo", "~/x/y"):
        assert not looks_like_repo(path_like), path_like
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "repo").write_bytes(b"GGUF")
    assert not looks_like_repo("org/repo")  # an existing file wins


def test_fit_names_a_missing_file_before_the_hub(publishers: FakeHub, tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    env = {"HF_ENDPOINT": publishers.url, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    for name in ("models/qwen3-8b", "qwen3-8b.gguf", "./org/repo"):
        result = _run_cli(tmp_path, env, "fit", name, "--vram", "8GiB")
        assert result.returncode == 1, result.stderr  # a runtime failure, not usage
        assert result.stderr.strip().count("\n") == 0, result.stderr
        assert f"no such file: {name}" in result.stderr
    assert publishers.requests == []  # the hub was never asked
    fitted = _run_cli(tmp_path, env, "fit", f"hf.co/{UNSLOTH}", "--vram", "8GiB", "--json")
    assert fitted.returncode == 0, fitted.stderr
    assert {f["quant"] for f in json.loads(fitted.stdout)["quants"]} >= {"UD-Q4_K_XL", "Q8_0"}
    pulled = _run_cli(
        tmp_path, env, "pull", f"https://hf.co/{UNSLOTH}:ud-q2_k_xl", "--quiet",
        "--models-dir", str(tmp_path / "models"),
    )  # fmt: skip
    assert pulled.returncode == 0, pulled.stderr
    assert pulled.stdout.strip() == str(tmp_path / "models" / "Model-UD-Q2_K_XL.gguf")
    missing = _run_cli(tmp_path, env, "pull", f"hf.co/{UNSLOTH}:Q5_K_M", "--quiet")
    assert missing.returncode == 1 and missing.stderr.strip().count("\n") == 0
    assert "has no quantization 'Q5_K_M'" in missing.stderr and "UD-Q4_K_XL" in missing.stderr


def test_fit_folder_chooses_once_per_model(tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    for quant in ("Q4_K_M", "Q8_0"):
        write_gguf(folder / f"Tiny-{quant}.gguf", TINY, quant=quant)
        write_gguf(folder / f"Tiny-Instruct-{quant}.gguf", TINY, quant=quant)  # same shapes
    wide = scaled(TINY, n_embd=1024, n_ff=2048)
    write_gguf(folder / "Wide.Q6_K.gguf", wide, quant="Q6_K")
    write_gguf(folder / "Wide.i1-Q4_K_M.gguf", wide, quant="Q4_K_M")
    result = _run_cli(tmp_path, {}, "fit", str(folder), "--vram", "8GiB", "--json")
    assert result.returncode == 0, result.stderr
    models = {m["model"]: m for m in json.loads(result.stdout)["models"]}
    assert set(models) == {"tiny", "tiny-instruct", "wide"}
    for name, entry in models.items():
        assert len(entry["files"]) == 2
        assert entry["plan"]["file"] in entry["files"], name
    text = _run_cli(tmp_path, {}, "fit", str(folder), "--vram", "8GiB")
    assert text.returncode == 0 and text.stdout.count("== ") == 3


def test_files_in_the_hugging_face_cache_are_reused(publishers: FakeHub, tmp_path: Path) -> None:
    from huggingface_hub import hf_hub_download

    hf_cache = tmp_path / "hf"
    for name in (
        "Model-Q4_K_M.gguf",
        *(f"Q8_0/Model-Q8_0-0000{i}-of-00003.gguf" for i in (1, 2, 3)),
    ):
        hf_hub_download(UNSLOTH, name, cache_dir=hf_cache, endpoint=publishers.url)
    sent = publishers.total_sent()
    hub_client = HubClient(endpoint=publishers.url, cache_dir=tmp_path / "c", hf_cache_dir=hf_cache)
    ref = RepoRef.parse(f"{UNSLOTH}:Q4_K_M")
    [(quant, header)] = hub_client.read_headers(ref)
    assert header.file_type == "Q4_K_M"
    path = hub_client.download(ref, quant, tmp_path / "models")
    _, split = hub_client.read_headers(RepoRef.parse(f"{UNSLOTH}:Q8_0"))[0]
    split_quant = select_quant(hub_client.list_quants(ref)[1], "Q8_0", UNSLOTH)
    first = hub_client.download(ref, split_quant, tmp_path / "models")
    assert publishers.total_sent() == sent  # no header read, no download: all from the cache
    assert path.stat().st_ino == hub_client.hf_cached(ref, quant.files[0], COMMIT).stat().st_ino
    assert first.name == "Model-Q8_0-00001-of-00003.gguf" and len(split.paths) == 3
    # a file not in the cache is still downloaded
    other = select_quant(hub_client.list_quants(ref)[1], "IQ4_XS", UNSLOTH)
    hub_client.download(ref, other, tmp_path / "models")
    assert publishers.total_sent() - sent == other.size
    # the hub is down and localllm never listed the repo: the Hugging Face cache's snapshot
    # still names the files, and serves their headers and bytes
    offline = HubClient(
        endpoint="http://127.0.0.1:9", cache_dir=tmp_path / "fresh", hf_cache_dir=hf_cache
    )
    _, cached = offline.list_quants(RepoRef.parse(UNSLOTH))
    assert sorted(q.label for q in cached) == ["Q4_K_M", "Q8_0"]
    [(quant, header)] = offline.read_headers(RepoRef.parse(f"{UNSLOTH}:Q8_0"))
    assert len(header.paths) == 3
    again = offline.download(RepoRef.parse(UNSLOTH), quant, tmp_path / "offline-models")
    assert again.stat().st_size == quant.files[0].size


def _run_cli(cwd: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run(
        [sys.executable, "-m", "localllm", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        env={**os.environ, "XDG_CACHE_HOME": str(cwd / "cache"), **env},
    )


def test_ladder_labels_are_distinct_per_file(tmp_path: Path) -> None:
    from localllm.gguf_header import read_header
    from localllm.models import ladder_labels

    # unsloth's UD-Q4_K_XL declares Q4_K_M in its header, as the plain Q4_K_M file does
    names = ("Model-Q4_K_M.gguf", "Model-UD-Q4_K_XL.gguf", "model.gguf", "other-Q8_0.gguf")
    quants = ("Q4_K_M", "Q4_K_M", "Q6_K", "Q8_0")
    headers = [
        read_header(write_gguf(tmp_path / name, TINY, quant=quant))
        for name, quant in zip(names, quants, strict=True)
    ]
    assert [h.file_type for h in headers[:2]] == ["Q4_K_M", "Q4_K_M"]
    labels = ladder_labels(headers)
    assert [labels[h.path] for h in headers] == ["Q4_K_M", "UD-Q4_K_XL", "Q6_K", "Q8_0"]
    twins = [read_header(write_gguf(tmp_path / f"{m}-Q4_K_M.gguf", TINY)) for m in ("a", "b")]
    assert sorted(ladder_labels(twins).values()) == ["a-Q4_K_M", "b-Q4_K_M"]
