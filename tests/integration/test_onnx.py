"""The ONNX Runtime backend and ``export-onnx``: parity with PyTorch and clear errors.

The exports are made once per session by ``export_onnx`` itself (conftest), from the real
MiniLM weights and the seeded random GPT-2, and read back from disk.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import onnx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from compare_tables import assert_same_tables
from conftest import CLI, SAMPLE_TEXTS, needs_minilm

from pipelines import models
from pipelines.analysis.batch import model_tables, sort_tables
from pipelines.backends import create_backend
from pipelines.backends.base import choose_backend
from pipelines.backends.batching import collate, plan_batches
from pipelines.backends.onnx.backend import CPU, OnnxBackend
from pipelines.backends.torch.backend import TorchBackend
from pipelines.config import AttentionMode, ConfigError, RunConfig, WindowConfig
from pipelines.dataset.reader import Dataset
from pipelines.dataset.tables import concat
from pipelines.dataset.writer import UMASK
from pipelines.jobs import export_onnx as onnx_export
from pipelines.jobs.export_onnx import ExportError, export_onnx, state_dict_sha256
from pipelines.jobs.local import run_job
from pipelines.models import ModelError
from pipelines.text.tokenize import Document, Windower

#: ONNX Runtime vs PyTorch: its own GEMMs and fused kernels (attention, LayerNorm, GELU) sum
#: in other orders than PyTorch's; float32 over MiniLM's 6 layers, the largest difference over
#: every weight of every head: 10x the batch-shape bound (tolerances.ATTENTION_ATOL, seen
#: ≤ 2.2e-6 there). Tables compare statistics, means over many weights, at STAT_ATOL.
ATTENTION_ATOL = 1e-4
LONG_TEXT = " ".join(SAMPLE_TEXTS) * 3
WINDOWS = WindowConfig(max_length=40, stride=8)


@pytest.fixture(scope="module")
def minilm_onnx(minilm_onnx_dir: Path) -> OnnxBackend:
    return OnnxBackend(str(minilm_onnx_dir), device="cpu")


@pytest.fixture(scope="module")
def gpt2_onnx(gpt2_onnx_dir: Path) -> OnnxBackend:
    return OnnxBackend(str(gpt2_onnx_dir), device="cpu")


@pytest.fixture(params=["minilm", "gpt2"])
def pair(request: pytest.FixtureRequest) -> tuple[TorchBackend, OnnxBackend]:
    """(PyTorch, ONNX Runtime) backends of one model; each test runs for both families."""
    name = request.param
    return request.getfixturevalue(name), request.getfixturevalue(f"{name}_onnx")


def sample_windows(backend: TorchBackend | OnnxBackend) -> list:
    """Short texts, a sentence pair (BERT only) and a long text cut into several windows."""
    windower = Windower(backend.tokenizer, backend.info, WINDOWS)
    docs = [Document(f"s{i}", t) for i, t in enumerate(SAMPLE_TEXTS)]
    docs.append(Document("long", LONG_TEXT))
    if not backend.info.causal:
        docs.append(Document("pair", "Where is the cat?", text_pair="On the mat."))
    return [w for doc in docs for w in windower.windows(doc)]


def tables(backend: TorchBackend | OnnxBackend, windows: list,
           mode: str = "topk:8") -> dict[str, pa.Table]:
    config = RunConfig(attention=AttentionMode.parse(mode), batch_tokens=160)
    return sort_tables(model_tables(backend, windows, config))


# ---------------------------------------------------------------------------------- export


def graph_outputs(folder: Path) -> dict[str, list]:
    graph = onnx.load(folder / onnx_export.GRAPH_FILE, load_external_data=False).graph
    return {o.name: [d.dim_value or d.dim_param for d in o.type.tensor_type.shape.dim]
            for o in graph.output}


def test_export_folder_holds_graph_config_tokenizer_and_metadata(
        minilm_onnx_dir: Path, minilm: TorchBackend) -> None:
    names = {p.name for p in minilm_onnx_dir.iterdir()}
    assert {"model.onnx", "model.onnx.data", "config.json", "tokenizer.json",
            models.ONNX_METADATA} <= names
    meta = json.loads((minilm_onnx_dir / models.ONNX_METADATA).read_text())
    assert meta["format"] == onnx_export.FORMAT and meta["graph"]["opset"] == 18
    assert meta["source"]["config_hash"] == minilm.info.config_hash
    assert meta["source"]["state_dict_sha256"] == state_dict_sha256(minilm.model)
    assert meta["graph"]["inputs"] == ["input_ids", "attention_mask", "token_type_ids"]
    assert meta["exporter"]["name"].startswith("torch.onnx.export")
    check = meta["verification"]
    # the export check compares ONNX with PyTorch itself: not bitwise (> 0), ATTENTION_ATOL
    assert check["provider"] == CPU and 0 < check["max_abs_diff_attention"] <= ATTENTION_ATOL
    assert max(shape[1] for shape in check["batches"]) == minilm.info.max_length  # a full window


def test_graph_outputs_every_layer_with_dynamic_batch_and_sequence(minilm_onnx_dir: Path,
                                                                   gpt2_onnx_dir: Path) -> None:
    bert, gpt2 = graph_outputs(minilm_onnx_dir), graph_outputs(gpt2_onnx_dir)
    assert list(bert) == [f"attention_{i}" for i in range(6)]
    for shape in bert.values():
        assert shape[1] == 12 and all(isinstance(d, str) for d in (shape[0], shape[2], shape[3]))
    assert list(gpt2) == [*(f"attention_{i}" for i in range(3)),
                          *(f"hidden_state_{i}" for i in range(4))]


def test_export_files_get_the_usual_permissions(minilm_onnx_dir: Path) -> None:
    assert stat.S_IMODE(minilm_onnx_dir.stat().st_mode) == 0o777 & ~UMASK
    meta = minilm_onnx_dir / models.ONNX_METADATA
    assert stat.S_IMODE(meta.stat().st_mode) == 0o666 & ~UMASK


def test_export_refuses_a_nonempty_folder_and_a_foreign_one(tmp_path: Path,
                                                            gpt2_dir: Path) -> None:
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="not empty"):
        export_onnx(str(gpt2_dir), tmp_path)
    with pytest.raises(ExportError, match="not an ONNX export"):
        export_onnx(str(gpt2_dir), tmp_path, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_export_that_does_not_verify_writes_nothing(tmp_path: Path, gpt2_dir: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(onnx_export, "TOLERANCE", 0.0)  # no float graph is that exact
    with pytest.raises(ExportError, match="differ by .* nothing was written"):
        export_onnx(str(gpt2_dir), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # no export, no staging folder left behind


# ---------------------------------------------------------------------------------- parity


def test_attentions_match_pytorch_on_padded_and_windowed_batches(
        pair: tuple[TorchBackend, OnnxBackend]) -> None:
    torch_backend, onnx_backend = pair
    windows = sample_windows(torch_backend)
    assert sum(w.doc.doc_id == "long" for w in windows) >= 3
    plan = plan_batches([w.n_tokens for w in windows], batch_tokens=160)
    assert any(len({windows[i].n_tokens for i in b}) > 1 for b in plan)  # some are padded
    for indices in plan:
        batch = collate([windows[i] for i in indices], torch_backend.info.pad_token_id)
        want, got = torch_backend.attentions(batch), onnx_backend.attentions(batch)
        assert got.shape == want.shape and got.dtype == torch.float32
        assert float((got - want).abs().max()) <= ATTENTION_ATOL
        pad_keys = ~batch.valid[None, :, None, None, :].expand_as(got)
        assert not got[pad_keys].any()  # exactly 0: masked logits underflow exp() to +0.0


def test_tables_match_pytorch(pair: tuple[TorchBackend, OnnxBackend]) -> None:
    """Identical documents and tokens, statistics within 1e-5, the same kept weights."""
    torch_backend, onnx_backend = pair
    windows = sample_windows(torch_backend)
    assert_same_tables(tables(onnx_backend, windows), tables(torch_backend, windows))


def test_batched_equals_one_at_a_time(pair: tuple[TorchBackend, OnnxBackend]) -> None:
    onnx_backend = pair[1]
    windows = sample_windows(onnx_backend)
    single = concat(tables(onnx_backend, [w]) for w in windows)
    assert_same_tables(tables(onnx_backend, windows), sort_tables(single))


def test_both_backends_describe_the_same_model(pair: tuple[TorchBackend, OnnxBackend]) -> None:
    torch_backend, onnx_backend = pair
    keep = ("name", "path")
    assert ({k: v for k, v in vars(onnx_backend.info).items() if k not in keep}
            == {k: v for k, v in vars(torch_backend.info).items() if k not in keep})
    runtime = onnx_backend.describe()
    assert runtime["backend"] == "onnx" and runtime["provider"] == CPU
    assert runtime["providers"] == [CPU] and runtime["device"] == "cpu"


# ----------------------------------------------------------------------------- corpus job


def test_a_corpus_job_gives_the_same_dataset_with_either_backend(
        tmp_path: Path, minilm_onnx_dir: Path) -> None:
    corpus = tmp_path / "docs.txt"
    corpus.write_text("\n".join([*SAMPLE_TEXTS, LONG_TEXT * 3]) + "\n", encoding="utf-8")
    outs = {}
    for backend, model in (("torch", "minilm"), ("auto", str(minilm_onnx_dir))):
        config = RunConfig(model=model, backend=backend, device="cpu",
                           windows=WindowConfig(max_length=64, stride=16), shard_tokens=100)
        outs[backend] = tmp_path / backend
        run_job([corpus], outs[backend], config, progress=False)
    onnx_data, torch_data = Dataset(outs["auto"]), Dataset(outs["torch"])
    assert onnx_data.manifest["runtime"]["backend"] == "onnx"
    assert onnx_data.manifest["runtime"]["provider"] == CPU
    assert onnx_data.manifest["model"]["config_hash"] == torch_data.manifest["model"]["config_hash"]
    names = ("documents", "tokens", "head_stats", "attention")
    assert_same_tables({name: pq.read_table(onnx_data.root / name) for name in names},
                       {name: pq.read_table(torch_data.root / name) for name in names})


# ------------------------------------------------------------------------- choice, errors


def test_auto_picks_onnx_for_an_export_folder_only(minilm_onnx_dir: Path) -> None:
    assert choose_backend("auto", str(minilm_onnx_dir)) == "onnx"
    assert choose_backend("auto", "minilm") == "torch"
    assert choose_backend("torch", str(minilm_onnx_dir)) == "torch"
    with pytest.raises(ConfigError, match="unknown backend 'tensorrt'"):
        choose_backend("tensorrt", "minilm")


def test_onnx_backend_on_a_plain_model_says_how_to_export() -> None:
    with pytest.raises(ModelError, match="no ONNX export .* `headscope export-onnx --model minilm"):
        create_backend("onnx", "minilm", "cpu")


def test_torch_backend_on_an_export_says_it_has_no_weights(minilm_onnx_dir: Path) -> None:
    with pytest.raises(ModelError, match="ONNX export \\(no PyTorch weights\\)"):
        create_backend("torch", str(minilm_onnx_dir), "cpu")


def copy_export(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def test_a_graph_without_attention_outputs_is_refused(minilm_onnx_dir: Path,
                                                      tmp_path: Path) -> None:
    folder = copy_export(minilm_onnx_dir, tmp_path / "cut")
    model = onnx.load(folder / "model.onnx", load_external_data=False)
    model.graph.output.pop()  # drop attention_5
    onnx.save(model, folder / "model.onnx")
    with pytest.raises(ModelError, match="no attention outputs attention_5"):
        OnnxBackend(str(folder), device="cpu")


def test_a_graph_exported_for_another_architecture_is_refused(
        minilm_onnx_dir: Path, gpt2_onnx_dir: Path, tmp_path: Path) -> None:
    folder = copy_export(minilm_onnx_dir, tmp_path / "mixed")
    shutil.copy(gpt2_onnx_dir / "config.json", folder / "config.json")
    with pytest.raises(ModelError, match="exported from a bert model .* describes a gpt2"):
        OnnxBackend(str(folder), device="cpu")


def test_a_missing_runtime_is_a_clear_error(minilm_onnx_dir: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if it were not installed
    with pytest.raises(ConfigError, match="needs ONNX Runtime: install the project's cpu extra"):
        OnnxBackend(str(minilm_onnx_dir), device="cpu")


def test_half_precision_is_refused(minilm_onnx_dir: Path) -> None:
    with pytest.raises(ConfigError, match="float32 graph"):
        OnnxBackend(str(minilm_onnx_dir), device="cpu", dtype="float16")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_cuda_without_a_cuda_provider_is_a_clear_error(minilm_onnx_dir: Path) -> None:
    with pytest.raises(ConfigError, match="no CUDA provider"):
        OnnxBackend(str(minilm_onnx_dir), device="cuda")


def onnxruntime_has_cuda() -> bool:
    """Whether the installed ONNX Runtime has a CUDA provider (onnxruntime-gpu)."""
    try:
        import onnxruntime
    except ImportError:
        return False
    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


@pytest.mark.gpu
@needs_minilm
@pytest.mark.skipif(not torch.cuda.is_available() or not onnxruntime_has_cuda(),
                    reason="needs CUDA and onnxruntime-gpu (its CUDAExecutionProvider)")
def test_cuda_provider_with_io_binding_matches_cpu(minilm_onnx_dir: Path,
                                                   minilm_onnx: OnnxBackend) -> None:
    gpu = OnnxBackend(str(minilm_onnx_dir), device="cuda")
    assert gpu.describe()["provider"] == "CUDAExecutionProvider"
    batch = collate(sample_windows(gpu)[:4], gpu.info.pad_token_id)
    got = gpu.attentions(batch)
    assert got.device.type == "cuda"
    assert float((got.cpu() - minilm_onnx.attentions(batch)).abs().max()) <= ATTENTION_ATOL


# ----------------------------------------------------------------------------------- CLI


def test_cli_exports_runs_and_explains_errors(tmp_path: Path, gpt2_dir: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    corpus = tmp_path / "docs.txt"
    corpus.write_text("One line.\nAnother, longer line of text.\n", encoding="utf-8")

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*CLI, *args], env=env, capture_output=True, text=True,
                              timeout=600)

    export = tmp_path / "gpt2-onnx"
    with ThreadPoolExecutor(3) as pool:
        exported = pool.submit(cli, "export-onnx", "--model", str(gpt2_dir), "--out", str(export))
        unknown = pool.submit(cli, "export-onnx", "--model", str(tmp_path / "nope"), "--out",
                              str(tmp_path / "x"))
        plain = pool.submit(cli, "run", str(corpus), "--out", str(tmp_path / "plain"),
                            "--backend", "onnx", "--device", "cpu", "--no-progress")
    done = exported.result()
    assert done.returncode == 0, done.stderr
    assert "3 attention outputs" in done.stdout and "max |ONNX Runtime - PyTorch|" in done.stdout
    for failed, message in ((unknown.result(), "neither a registry name"),
                            (plain.result(), "headscope export-onnx")):
        assert failed.returncode == 2 and message in failed.stderr, failed.stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "plain").exists()
    ran = cli("run", str(corpus), "--out", str(tmp_path / "ds"), "--model", str(export),
              "--device", "cpu", "--no-progress")
    assert ran.returncode == 0, ran.stderr
    manifest = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    assert manifest["runtime"]["backend"] == "onnx" and manifest["config"]["backend"] == "auto"
