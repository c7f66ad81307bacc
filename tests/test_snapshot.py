"""The allocator-snapshot reader (qlora/report/snapshot.py) on snapshots in the CUDA allocator's own format, recorded
on the CPU by qlora/report/recorder.py: the peak it replays, what it names at the peak, and what it cannot name."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qlora.config import apply_overrides, load_recipe
from qlora.levers.tiling.memory import NORM_TILE_BYTES_PER_HIDDEN
from qlora.levers.tiling.tiles import tile_module
from qlora.memory.activations import NORM_BACKWARD_FP32
from qlora.memory.arch import load_arch
from qlora.memory.estimate import estimate
from qlora.report import attribution, replay, snapshot
from qlora.report.recorder import AllocationRecorder, record_steps

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
import snapshot_fixture  # noqa: E402  (the committed snapshot's recipe and its stray block)
from support import recorded_and_estimated  # noqa: E402

ACTIONS = {"alloc", "free_requested", "free_completed", "segment_alloc", "segment_free", "segment_map",
           "segment_unmap", "snapshot", "oom"}


@pytest.fixture(scope="module")
def committed() -> dict:
    return replay.load(snapshot_fixture.FIXTURE)


@pytest.fixture(scope="module")
def shape() -> attribution.Shape:
    return attribution.shape_for(snapshot_fixture.config(), snapshot_fixture.TOKENS, "cpu")


def test_the_committed_snapshot_is_small_and_in_the_allocators_format(committed: dict) -> None:
    assert snapshot_fixture.FIXTURE.stat().st_size < 2**20
    events = committed["device_traces"][0]
    assert events and {e["action"] for e in events} <= ACTIONS
    for e in events:
        assert {"action", "addr", "size", "stream", "frames"} <= e.keys() and e["size"] % 512 == 0
        assert all(f.keys() == {"filename", "line", "name"} for f in e["frames"])
    for seg in committed["segments"]:
        assert {"device", "address", "total_size", "blocks"} <= seg.keys()
        assert all(b["state"] == "active_allocated" and "frames" in b for b in seg["blocks"])
    # No machine's paths: repository files and installed packages are named from their own roots.
    files = {f["filename"] for e in events for f in e["frames"]}
    assert "qlora/levers/tiling/tiles.py" in files and not any(f.startswith(("/work", "/home", "/root")) for f in files)


def test_every_block_at_the_peak_is_named_but_the_stray_one(committed: dict, shape: attribution.Shape) -> None:
    found = replay.peak(committed)
    terms, unexplained, small = attribution.attribute(found, shape, 64 * 2**10)
    assert [b.size for b in unexplained] == [snapshot_fixture.STRAY_BYTES]
    assert snapshot.where_text(unexplained[0]).count("stray_buffer") == 1
    assert sum(b.size for blocks in terms.values() for b in blocks) + unexplained[0].size + small == found.allocated
    # What the peak of a tiled bf16 step holds: the layer's saved tensors, a tile's working set, gradients.
    assert {"saved: norms (fp32 input, rsqrt)", "tiles: one tile's working set", "quantized_weights",
            "optimizer_state", "layer inputs (checkpoint plan: kept on the device)"} <= terms.keys()
    text = snapshot.report(committed, shape, 64 * 2**10)
    assert "| **unexplained** | 1 | 0.750 | 1,536 | 3.00 |" in text and "stray_buffer" in text
    # The terms largest first, as the reader looks for what the peak holds most of.
    held = [float(line.split(" | ")[2]) for line in text.splitlines() if line.startswith("| ") and
            not line.startswith(("| term ", "| **"))]
    assert len(held) == len(terms) and held == sorted(held, reverse=True) and held[0] > held[-1]


def test_the_estimate_accounts_for_the_recorded_peak(committed: dict) -> None:
    """The recording counts tensors as the estimator does, without the noise of a resident set: the peak less the
    stray block within 5% of the estimate for the same recipe and shape."""
    cfg = snapshot_fixture.config()
    tensors = replay.peak(committed).allocated - snapshot_fixture.STRAY_BYTES
    est = estimate(cfg, load_arch(cfg), "qlora", "cpu")
    held = est.peak_bytes - est.components.get("tokenised_rows", 0)  # Python's arrays, no tensor the recording sees
    assert abs(held / tensors - 1) <= 0.05, (held, tensors)


def test_the_replayed_peak_is_the_recorders_even_when_the_trace_lost_its_start() -> None:
    """A fresh recording (the tiny Llama, one step): the replay finds the peak the recorder kept as it went; with the
    oldest events gone, as `max_entries` drops them, the blocks alive before the trace come from the end state and the
    frees of blocks never seen allocated, and the peak stays where it was."""
    cfg = apply_overrides(load_recipe(ROOT / "recipes" / "tiny.py"),
                          ["--model.synthetic=true", "--model.config_json=tests/snapshots/narrow-llama.json",
                           "--data.max_seq_len=256", "--train.batch_size=1"])
    recorded, live_peak = record_steps(cfg, 1)
    whole = replay.peak(recorded)
    assert whole.allocated == live_peak and whole.allocated == sum(b.size for b in whole.blocks)
    cut = copy.copy(recorded)
    events = recorded["device_traces"][0]
    drop = whole.index // 2
    cut["device_traces"] = [events[drop:]]
    lost = replay.peak(cut)
    assert lost.allocated == whole.allocated and lost.index == whole.index - drop
    assert sorted((b.addr, b.size) for b in lost.blocks) == sorted((b.addr, b.size) for b in whole.blocks)


def test_reserved_memory_follows_the_segments_and_expandable_mappings() -> None:
    """A CUDA-style trace: a cudaMalloc'd segment, then an expandable segment mapped and unmapped around blocks. The
    peak of allocated memory and what was reserved at it (and at most) come from the events; the end state agrees."""
    mib = 2**20

    def event(action: str, addr: int, size: int) -> dict:
        return {"action": action, "addr": addr, "size": size, "stream": 0, "frames": []}

    trace = [event("segment_alloc", 0, 20 * mib), event("alloc", 0, 8 * mib),  # 8 of 20 reserved
             event("segment_map", 100 * mib, 32 * mib), event("alloc", 100 * mib, 30 * mib),  # 38 of 52: the peak
             event("free_requested", 100 * mib, 30 * mib), event("free_completed", 100 * mib, 30 * mib),
             event("alloc", 100 * mib, 10 * mib),  # 18 of 52: the freed block stays mapped
             event("segment_unmap", 120 * mib, 12 * mib)]  # 18 of 40
    segments = [{"device": 0, "address": 0, "total_size": 20 * mib, "blocks": [
                    {"address": 0, "size": 8 * mib, "state": "active_allocated", "frames": []},
                    {"address": 8 * mib, "size": 12 * mib, "state": "inactive", "frames": []}]},
                {"device": 0, "address": 100 * mib, "total_size": 20 * mib, "blocks": [
                    {"address": 100 * mib, "size": 10 * mib, "state": "active_allocated", "frames": []},
                    {"address": 110 * mib, "size": 10 * mib, "state": "inactive", "frames": []}]}]
    found = replay.peak({"segments": segments, "device_traces": [trace]})
    assert (found.allocated, found.index, found.reserved_then, found.peak_reserved) == (38 * mib, 3, 52 * mib,
                                                                                       52 * mib)
    assert (found.allocated_end, found.reserved_end) == (18 * mib, 40 * mib)
    assert "14.000 MiB of it not allocated" in snapshot.report({"segments": segments, "device_traces": [trace]})


@pytest.mark.parametrize("name", ["torch::autograd::generated::PowBackward0::apply(std::vector<at::Tensor>&&)",
                                  "_ZN5torch8autograd9generated12PowBackward05applyEOSt6vectorIN2at6TensorESaIS5_EE"])
def test_the_autograd_node_is_read_from_a_named_or_a_mangled_frame(name: str) -> None:
    """A CUDA snapshot's C++ frames are named by addr2line, or left mangled by the faster dladdr the battery asks
    for (TORCH_SYMBOLIZE_MODE): either names the node, which tells an RMSNorm's fp32 gradients from SDPA's."""
    frames = [{"filename": "", "line": 0, "name": "c10::cuda::CUDACachingAllocator::malloc"},
              {"filename": "", "line": 0, "name": name}]
    assert attribution.autograd_node(frames) == "PowBackward0"
    assert attribution.autograd_node(frames[:1]) == ""


def test_frames_are_read_wherever_the_libraries_are_installed() -> None:
    """The GPU image keeps every library under /opt/torch/.venv: a transformers frame there is not torch's own, and
    bitsandbytes quantising a checkpoint that transformers loads makes quantised weights."""
    site = "/opt/torch/.venv/lib/python3.12/site-packages"
    frame = lambda file, name: {"filename": f"{site}/{file}", "line": 1, "name": name}  # noqa: E731
    loaded = replay.Block(0, 2**20, [frame("bitsandbytes/nn/modules.py", "_quantize"),
                                       frame("transformers/modeling_utils.py", "from_pretrained")])
    assert attribution.phase(loaded.frames) == "load" and attribution.term(loaded, None) == "quantized_weights"
    plain = replay.Block(0, 2**20, [frame("torch/nn/modules/module.py", "to"),
                                      frame("transformers/modeling_utils.py", "from_pretrained")])
    assert attribution.term(plain, None) == "unquantized_weights"
    assert not attribution.in_torch(f"{site}/transformers/modeling_utils.py")
    assert attribution.in_torch(f"{site}/torch/nn/functional.py") and attribution.in_torch("torch/autograd/graph.py")


def test_an_rmsnorm_backward_holds_the_fp32_temporaries_the_estimate_counts() -> None:
    """transformers' LlamaRMSNorm in bf16 computes in fp32; torch's autograd formulas for it hold NORM_BACKWARD_FP32
    fp32 tensors of the input's size at once (the term behind the 70B's missing ~110 KB per token on the H200)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(256).to(torch.bfloat16)
    x = torch.randn(1, 512, 256, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn_like(x)
    fp32 = 512 * 256 * 4
    with AllocationRecorder() as recorder:
        y = norm(x)
        mark = len(recorder.events)
        y.backward(grad)
        recorded = recorder.snapshot()
    alive, most = set(), 0
    for e in recorded["device_traces"][0][mark:]:  # fp32 blocks of the input's size the backward made, at once
        if e["size"] == fp32 and e["action"] == "alloc":
            alive.add(e["addr"])
            most = max(most, len(alive))
        elif e["action"] == "free_requested":
            alive.discard(e["addr"])
    assert most == NORM_BACKWARD_FP32


def test_a_tiled_rmsnorm_backward_holds_one_tiles_fp32_working_set() -> None:
    """train.tile_norms: the tiled norm's backward grows by NORM_TILE_BYTES_PER_HIDDEN per tile token and hidden unit
    (a tile's recompute and backward in fp32), and beyond the tiles holds only its input's gradient at full length,
    where the plain norm's holds NORM_BACKWARD_FP32 fp32 tensors of the whole row."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    h, T = 256, 8192
    peaks = {}
    for tile in (512, 1024, 2048):
        norm = LlamaRMSNorm(h).to(torch.bfloat16)
        tile_module(norm, tile)
        x = torch.randn(1, T, h, dtype=torch.bfloat16, requires_grad=True)
        y = norm(x)
        with AllocationRecorder() as recorder:
            y.backward(torch.randn_like(y))
        peaks[tile] = recorder.peak_bytes
    assert peaks[2048] - peaks[1024] == 2 * (peaks[1024] - peaks[512]) == NORM_TILE_BYTES_PER_HIDDEN * 1024 * h
    full_length = peaks[512] - NORM_TILE_BYTES_PER_HIDDEN * 512 * h
    # The input's gradient and what autograd does with it for a leaf (measured: 3 bf16 copies of the row, and a few
    # KiB), against the plain norm's 5 fp32 ones.
    assert full_length <= 3 * T * h * 2 + 2**16 < NORM_BACKWARD_FP32 * T * h * 4, full_length / (T * h)


def test_tiled_norms_save_in_a_bf16_step_what_the_estimate_says() -> None:
    """train.tile_norms where it matters, a bf16 step at long context (8,192 tokens of the tiny Llama, tiles of 1,024,
    loss chunks so the layers' backward is the peak): each recorded peak within 5% above or below the estimate, the
    saving within 10% of the estimated one. Recorded on this CPU: 44.5 and 22.7 MiB (the norms folded into the tiles
    they feed), estimated 45.5 and 23.5."""
    base = ["--data.max_seq_len=8192", "--train.batch_size=1", "--train.tile_size=1024",
            "--train.tile_projections=true", "--quant.compute_dtype=bf16", "--train.loss_chunk_size=1024"]
    recorded, estimated = {}, {}
    for norms in (False, True):
        recorded[norms], estimated[norms] = recorded_and_estimated(*base, f"--train.tile_norms={norms}")
        assert abs(estimated[norms] / recorded[norms] - 1) <= 0.05, (norms, estimated[norms], recorded[norms])
    saving = recorded[False] - recorded[True]
    assert saving > 0.3 * recorded[False]
    assert abs(saving / (estimated[False] - estimated[True]) - 1) <= 0.10, (saving, estimated)


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_eager_attentions_scores_are_in_the_estimate(dtype: str) -> None:
    """model.attn_implementation=eager keeps s x s scores per head: a recorded step of the narrow Llama at 2,048
    tokens holds ten times the sdpa step's memory, and the estimate follows it within 5%. Recorded on this CPU: 405.2
    MiB in bf16 and 418.4 in fp32, estimated 412.7 and 430.9 (36.8 and 63.9 MiB with sdpa)."""
    recorded, estimated = recorded_and_estimated(
        "--model.synthetic=true", "--model.config_json=tests/snapshots/narrow-llama.json", "--data.max_seq_len=2048",
        "--train.batch_size=1", f"--quant.compute_dtype={dtype}", "--model.attn_implementation=eager")
    assert recorded > 8 * 2048 * 2048 * 8  # more than two fp32 scores of every head: the case is the scores
    assert abs(estimated / recorded - 1) <= 0.05, (estimated, recorded)


def test_the_command_reads_a_snapshot_and_compacts_it(tmp_path: Path) -> None:
    args = ["--recipe=recipes/tiny.py", f"--tokens={snapshot_fixture.TOKENS}", "--device=cpu", "--min-mib=0.0625",
            *[f"--override={o}" for o in snapshot_fixture.OVERRIDES if not o.startswith("--data.max_seq_len")]]
    out = tmp_path / "compact.pickle.gz"
    done = subprocess.run([sys.executable, "-m", "qlora.report.snapshot", str(snapshot_fixture.FIXTURE),
                           f"--compact={out}"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    shown = [subprocess.run([sys.executable, "-m", "qlora.report.snapshot", str(path), *args], cwd=ROOT,
                            capture_output=True, text=True) for path in (snapshot_fixture.FIXTURE, out)]
    assert shown[0].returncode == 0, shown[0].stderr
    assert shown[0].stdout == shown[1].stdout and "stray_buffer" in shown[0].stdout
    refused = subprocess.run([sys.executable, "-m", "qlora.report.snapshot", str(out), "--recipe=recipes/tiny.py"],
                             cwd=ROOT, capture_output=True, text=True)
    assert refused.returncode == 2 and refused.stderr.strip() == "error: --recipe needs --tokens: the length of " \
                                                                  "the run's rows"


class RunsCode:
    """What a hostile snapshot would hold: a pickle that calls a function as it loads."""

    def __reduce__(self) -> tuple:
        return (Path.touch, (Path(sys.argv[0]).with_name("ran"),))


@pytest.mark.parametrize("content", ["code", "cut short", "empty", "text", "a list", "segments not a list",
                                     "an event without an address"])
def test_a_file_that_is_no_snapshot_is_one_line_and_runs_nothing(tmp_path: Path, content: str) -> None:
    """pickle.loads ran whatever the file named (the battery brings snapshots back from another machine), and every
    malformed file ended in a traceback."""
    import gzip
    import pickle

    committed = (ROOT / "tests" / "snapshots" / "narrow-bf16-512.pickle.gz").read_bytes()
    ran = tmp_path / "ran"
    events = {"segments": [], "device_traces": [[{"action": "alloc", "size": 512}]]}
    data = {"code": lambda: pickle.dumps({"segments": [RunsCode()]}).replace(
                str(Path(sys.argv[0]).with_name("ran")).encode(), str(ran).encode()),
            "cut short": lambda: committed[:5000], "empty": lambda: b"", "text": lambda: gzip.compress(b"hello"),
            "a list": lambda: pickle.dumps([1, 2]), "segments not a list": lambda: pickle.dumps({"segments": 5}),
            "an event without an address": lambda: pickle.dumps(events)}[content]()
    path = tmp_path / "snapshot.pickle"
    path.write_bytes(data)
    proc = subprocess.run([sys.executable, "-m", "qlora.report.snapshot", str(path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: {path} is not an allocator snapshot ("), lines[0]
    assert not ran.exists()


def test_the_report_counts_the_blocks_at_the_peak_and_the_reserve_then() -> None:
    """An older snapshot's segment (blocks without addresses: they lie one after another), one block of it pending
    its free (no longer allocated), a block of exactly --min-mib, and a segment reserved after the peak: the report's
    first lines say what was allocated and reserved at the peak, and every block at it of --min-mib or more."""
    mib = 2**20

    def event(action: str, addr: int, size: int) -> dict:
        return {"action": action, "addr": addr, "size": size, "stream": 0, "frames": []}

    old = [{"size": 2 * mib, "state": "active_allocated"}, {"size": 3 * mib, "state": "active_pending_free"},
           {"size": 4 * mib, "state": "active_allocated"}, {"size": 7 * mib, "state": "inactive"}]
    segments = [{"device": 0, "address": 0, "total_size": 16 * mib, "blocks": old},
                {"device": 0, "address": 100 * mib, "total_size": 8 * mib, "blocks": [
                    {"address": 100 * mib, "size": 8 * mib, "state": "inactive", "frames": []}]},
                {"device": 0, "address": 200 * mib, "total_size": 32 * mib, "blocks": [
                    {"address": 200 * mib, "size": 32 * mib, "state": "inactive", "frames": []}]}]
    trace = [event("segment_alloc", 100 * mib, 8 * mib), event("alloc", 100 * mib, 6 * mib),  # 2 + 4 + 6 of 24
             event("free_requested", 100 * mib, 6 * mib), event("segment_alloc", 200 * mib, 32 * mib)]
    found = replay.peak({"segments": segments, "device_traces": [trace]})
    assert sorted((b.addr, b.size) for b in found.blocks) == [(0, 2 * mib), (5 * mib, 4 * mib), (100 * mib, 6 * mib)]
    lines = snapshot.report({"segments": segments, "device_traces": [trace]}, min_bytes=2 * mib).splitlines()
    assert lines[0] == "peak allocated 12.000 MiB after event 1 of 4; reserved then 24.000 MiB, 12.000 MiB of it " \
                       "not allocated (the allocator's reserve and fragmentation); peak reserved 56.000 MiB"
    assert lines[1] == "3 blocks of 2 MiB or more alive at the peak; smaller blocks 0.000 MiB"


def test_a_frameless_block_of_the_targets_hidden_states_is_the_losss(shape: attribution.Shape) -> None:
    """On CUDA autograd's engine leaves no Python frame: a block of N h 4 (the targets' hidden states in fp32, N the
    row's tokens less the last, which predicts no label) is read as the loss's by its size alone."""
    assert shape.targets == snapshot_fixture.TOKENS - 1  # one row a micro-batch
    h = shape.widths["h"]
    block = replay.Block(0, -(-(snapshot_fixture.TOKENS - 1) * h * 4 // 512) * 512)
    assert attribution.term(block, shape) == "loss (final norm, labels, logits)"


def test_a_frameless_block_of_a_trained_tensors_fp32_gradient_is_a_gradient(shape: attribution.Shape) -> None:
    """A bf16 run's adapters train with fp32 gradients (their masters sum them in fp32): on CUDA, where autograd's
    engine leaves no frame, a block of the largest adapter's elements x 4 bytes is read as a gradient by its size."""
    from qlora.memory.terms import trainable_tensors

    cfg = snapshot_fixture.config()
    assert shape.e == 2
    largest = max(trainable_tensors(load_arch(cfg), "qlora", cfg))
    assert attribution.term(replay.Block(0, -(-largest * 4 // 512) * 512), shape) == "gradients"


def test_a_recorded_block_takes_the_cuda_allocators_512_byte_granularity() -> None:
    """The recorder sizes each block as the CUDA caching allocator would (kMinBlockSize, 512 bytes) and keeps the bytes
    asked for beside it: 100 bytes are a block of 512, 1,000 of 1,024, so that a CPU recording replays as a CUDA one."""
    with AllocationRecorder() as recorder:
        alive = torch.ones(100, dtype=torch.uint8), torch.ones(1000, dtype=torch.uint8)  # both alive at the snapshot
        recorded = recorder.snapshot()
    blocks = {b["requested_size"]: b["size"] for s in recorded["segments"] for b in s["blocks"]}
    assert blocks[100] == 512 and blocks[1000] == 1024 and len(alive) == 2
    assert recorder.peak_bytes == replay.peak(recorded).allocated == 512 + 1024
