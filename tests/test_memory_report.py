"""What the memory report says: the committed reports rendered from their .json, and the figures of a measured one
(Llama-3.1-70B on an H200) read from its bytes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from qlora.config import METHODS, apply_overrides, load_recipe
from qlora.memory.arch import load_arch
from qlora.memory.estimate import estimate
from qlora.report.contents import build_report, method_config
from qlora.report.markdown import markdown, summary_lines

ROOT = Path(__file__).resolve().parent.parent
REPORTS = ROOT / "memory_reports"
GIB = 2**30


def report(name: str) -> dict:
    return json.loads((REPORTS / f"{name}.json").read_text())


@pytest.mark.parametrize("name", ["llama70b-h200", "llama8b-h200", "smollm2_135m-h200", "smollm2_135m-cpu",
                                  "llama70b-none", "llama8b-none"])
def test_a_committed_report_is_what_its_json_renders(name):
    """Each .md is markdown() of the .json beside it (regenerate with the command each names)."""
    assert markdown(report(name), f"{name}.png") == (REPORTS / f"{name}.md").read_text()


def test_a_measured_report_gives_gib_gb_and_the_error_of_the_estimate():
    """The 70B QLoRA row: 39,484,015,876 bytes estimated are 36.77 GiB (39.5 GB), 14,547,156,992 of host 13.55 GiB,
    41,075,671,040 measured 38.25 GiB, and the estimate is 3.9% under the measured; full fine-tuning, 395.82 GiB, is
    not measured on the 139.80 GiB card and does not fit."""
    r = report("llama70b-h200")
    q = r["methods"]["qlora"]
    est, host, got = q["estimated_peak_bytes"], q["host_bytes"], q["measured_peak_bytes"]
    assert (est, host, got) == (39_484_015_876, 14_547_156_992, 41_075_671_040)
    assert (f"{est / GIB:.2f}", f"{est / 1e9:.1f}", f"{host / GIB:.2f}", f"{got / GIB:.2f}",
            f"{100 * (est / got - 1):+.1f}") == ("36.77", "39.5", "13.55", "38.25", "-3.9")
    md = markdown(r, "llama70b-h200.png")
    assert "| QLoRA, NF4 + double quant | 36.77 (39.5) | 13.55 | 38.25 | -3.9% | fits |" in md
    assert "| full fine-tuning | 395.82 (425.0) | 1,071.57 | not measured: the estimate (395.8 GiB) exceeds the " \
           "139.8 GiB available | – | **does not fit** (395.82 > 139.80 GiB) |" in md
    # The measured column is the measured breakdown (activations: the rest of 38.25), the estimate's beside it.
    rest = q["measured_components"]["activations"]
    assert f"| activations and temporaries (measured: the rest) | {q['components']['activations'] / GIB:.2f} | " \
           f"{rest / GIB:.2f} |" in md and f"{rest / GIB:.2f}" == "1.81"
    assert f"| backward | {got / GIB:.2f} | 132.81 | – |" in md
    assert summary_lines(r)[1] == "  qlora estimated 36.77 GiB (39.5 GB), host 13.55 GiB, measured 38.25 GiB " \
                                  "(estimate -3.9%)"


@pytest.mark.parametrize("name", ["llama70b", "llama8b"])
def test_each_methods_column_is_the_estimate_of_that_method(name):
    """16-bit LoRA's column is estimated (and measured, with the overrides it is given) on a 16-bit base, its head
    too, and full fine-tuning's with every weight's gradient and optimizer state, not QLoRA's figures; a method fits a
    card that holds its peak and the allocator's margin, and one a byte smaller does not."""
    cfg = load_recipe(ROOT / "recipes" / f"{name}.py")
    qlora = estimate(cfg, load_arch(cfg), "qlora", "cuda")
    card = qlora.card_bytes
    r = build_report(f"recipes/{name}.py", [], cfg, [], list(METHODS), False, card=(card, "a card"))
    for method, entry in r["methods"].items():
        mcfg, extra = method_config(cfg, method)
        apply_overrides(load_recipe(ROOT / "recipes" / f"{name}.py"), extra)  # what --measure runs: the trainer takes
        est = estimate(mcfg, load_arch(mcfg), method, "cuda")
        assert (entry["estimated_peak_bytes"], entry["components"]) == (est.peak_bytes, est.components), method
    lora, full = r["methods"]["lora"]["components"], r["methods"]["full"]["components"]
    assert lora["quantized_weights"] == 0 and lora["unquantized_weights"] > 2 * r["arch"]["linear_params"]
    assert full["adapters"] == 0 and full["gradients"] + r["methods"]["full"]["host_bytes"] >= \
        2 * r["arch"]["params"]
    assert r["methods"]["qlora"]["fits"] and qlora.margin > 0
    smaller = build_report(f"recipes/{name}.py", [], cfg, [], ["qlora"], False, card=(card - 1, "a card"))
    assert not smaller["methods"]["qlora"]["fits"]
    line = summary_lines(r)[1]
    assert f"{qlora.peak_bytes / GIB:.2f} GiB ({qlora.peak_bytes / 1e9:.1f} GB), {card / GIB:.2f} GiB with the " \
           "allocator's margin" in line, line


def test_a_measured_entry_gives_the_estimates_error_against_the_measured_peak(monkeypatch):
    """`--measure`'s entry: the error is the estimate's against the measured peak (estimate / measured - 1: 25% more
    measured is -20%), and a phase measured on CUDA is its card's total (reserved + outside + context), elsewhere the
    allocated bytes."""
    import qlora.report.measure
    from qlora.report.contents import measure_entry

    cfg = load_recipe(ROOT / "recipes" / "tiny.py")
    est = estimate(cfg, load_arch(cfg), "qlora", "cpu")
    measured = est.peak_bytes * 5 // 4
    got = {"measured_peak_bytes": measured, "measured_components": {"adapters": 1}, "peak_phase": "backward",
           "phases": {"loaded": {"allocated": 3}, "backward": {"allocated": 5, "card_total": 7}},
           "load_peak_bytes": 3, "seconds": 1.0, "device": "cpu"}
    monkeypatch.setattr(qlora.report.measure, "measure_in_subprocess", lambda *args: got)
    entry = measure_entry("recipes/tiny.py", [], est, "cpu")
    assert entry["error"] == pytest.approx(est.peak_bytes / measured - 1) and round(entry["error"], 3) == -0.2
    assert entry["measured_peak_bytes"] == measured and entry["measured_phases"] == {"loaded": 3, "backward": 7}
    # A card's measured peak holds the allocator's reserve: a CUDA estimate is set against it with its margin.
    cuda = estimate(cfg, load_arch(cfg), "qlora", "cuda")
    assert cuda.margin > 0
    entry = measure_entry("recipes/tiny.py", [], cuda, "cpu")
    assert entry["error"] == pytest.approx(cuda.card_bytes / measured - 1) != cuda.peak_bytes / measured - 1


def test_the_command_draws_the_report_against_the_card_and_methods_named(capsys):
    """`--gpu-gib 24` is a card of 24 GiB (25,769,803,776 bytes, not 24 GB), `--methods` the methods reported,
    `--measure` a measured report, and a report measured on an NVIDIA H200 is named `-h200` (memory_reports/)."""
    from qlora.report.memory import device_slug, main, parse_cli

    assert main(["recipes/llama8b.py", "--methods=qlora,full", "--gpu-gib", "24", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["device_memory_bytes"] == 24 * GIB == 25_769_803_776 and list(r["methods"]) == ["qlora", "full"]
    assert parse_cli(["recipes/tiny.py", "--measure"]).measure and not parse_cli(["recipes/tiny.py"]).measure
    assert device_slug("NVIDIA H200") == "h200" and device_slug("cpu") == "cpu" and device_slug("none") == "none"


@pytest.mark.parametrize("value", ["qlora,,lora", "qlora,", ",lora", " , lora"])
def test_methods_with_an_empty_item_are_refused_and_spaces_around_one_are_not(value):
    """--methods qlora,,lora was read as qlora,lora, the empty item dropped without a word: refused wherever it lies,
    two items or more; an item's spaces (qlora, lora) are not the user's slip, and an empty --methods is no method."""
    from qlora.errors import ConfigError
    from qlora.report.memory import parse_cli

    with pytest.raises(ConfigError, match=f"^--methods {re.escape(repr(value))} has an empty item"):
        parse_cli(["recipes/tiny.py", f"--methods={value}"])
    assert parse_cli(["recipes/tiny.py", "--methods= qlora , lora"]).methods == ["qlora", "lora"]
    with pytest.raises(ConfigError, match=r"^--methods '': use a comma-separated subset of qlora,lora,full$"):
        parse_cli(["recipes/tiny.py", "--methods="])


def test_the_plan_for_a_card_named_keeps_a_lever_the_command_line_sets(capsys):
    """`--gpu-gib N` shows train.plan=fastest's choice "as qlora.train would there", and qlora.train keeps a lever set
    on its command line: the 70B recipe on 24 GiB with --train.stream_base=false was shown streaming its base (the
    plan's choice), where the run keeps it in place, finds no plan and is refused."""
    from qlora.report.memory import main

    args = ["recipes/llama70b.py", "--methods=qlora", "--gpu-gib", "24", "--json"]
    assert main(args) == 0
    assert "--train.stream_base=true" in json.loads(capsys.readouterr().out)["plan"]["chose"]
    assert main([*args, "--train.stream_base=false"]) == 0
    r = json.loads(capsys.readouterr().out)
    qlora = r["methods"]["qlora"]
    assert r["plan"]["chose"] is None and not qlora["fits"] and not qlora.get("streamed")


def test_a_cpu_report_names_the_tokenised_rows_estimated_and_measured():
    """A CPU peak is host memory, the tokenised rows part of it (the profiler names them, qlora/data/tokens.py); the
    report gives them a row of their own, measured only in a report made before the estimate counted them from the
    data files' sizes (rows.py), estimated too since. A report measured before they were named has no such row."""
    r = report("smollm2_135m-cpu")
    assert "tokenised rows" not in markdown(r, "smollm2_135m-cpu.png")
    for n, e in enumerate(r["methods"].values(), 1):
        e["measured_components"]["tokenised_rows"] = n * 2**20
    assert "| tokenised rows (host memory, measured only) | – | 0.001 | – | 0.002 | – | 0.003 |" in \
        markdown(r, "smollm2_135m-cpu.png")
    for e in r["methods"].values():  # a report made since: the estimate counts them from the files' sizes (rows.py)
        e["components"]["tokenised_rows"] = 3 * 2**20
    assert "| tokenised rows (host memory) | 0.003 | 0.001 | 0.003 | 0.002 | 0.003 | 0.003 |" in \
        markdown(r, "smollm2_135m-cpu.png")


def drawn(report: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> object:
    """The axes plot_report draws for a report, kept open past its savefig."""
    import matplotlib.pyplot as plt

    from qlora.report import plot

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    plot.plot_report(report, tmp_path / "report.png")
    [figure] = figures
    return figure.axes[0]


def stacks(ax: object) -> list[list[tuple[float, float]]]:
    """Each bar's blocks, left to right, as (bottom, height) from the bottom up."""
    bars: dict[float, list] = {}
    for block in ax.patches:
        bars.setdefault(round(block.get_x() + block.get_width() / 2, 6), []).append(
            (block.get_y(), block.get_height(), block.get_hatch()))
    return [bars[x] for x in sorted(bars)]


def test_the_figure_draws_each_bar_to_scale_and_the_one_past_the_card_cut_off(tmp_path, monkeypatch):
    """The 70B H200 report in GiB on an axis 1.25 x the 139.80 GiB card, its line at 139.80: each bar its blocks
    stacked, an estimate's to its peak, a measured one's its measured breakdown up to its peak; full fine-tuning's
    395.82 GiB drawn hatched at 1.1 x the card (1/3 scale) and said, its measurement 'not measured: does not fit';
    each estimate's error (-3.9%, -0.3%) over its pair."""
    r = report("llama70b-h200")
    ax = drawn(r, tmp_path, monkeypatch)
    card = r["device_memory_bytes"] / GIB
    assert ax.get_ylabel() == "GiB" and ax.get_ylim() == pytest.approx((0, 1.25 * card))
    assert [line.get_ydata()[0] for line in ax.lines] == pytest.approx([card])
    q, lora, full = (r["methods"][m] for m in ("qlora", "lora", "full"))
    expected = [q["components"], q["measured_components"], lora["components"], lora["measured_components"]]
    got = stacks(ax)
    assert len(got) == 5  # full's measurement has no blocks
    for blocks, parts in zip(got, expected, strict=False):
        assert sorted(h for _, h, _ in blocks) == pytest.approx(sorted(v / GIB for v in parts.values() if v > 0))
        assert [b for b, _, _ in blocks] == pytest.approx([0] + [b + h for b, h, _ in blocks[:-1]])
        assert {hatch for *_, hatch in blocks} == {None}
    for blocks, e in ((got[0], q), (got[2], lora)):
        assert sum(h for _, h, _ in blocks) == pytest.approx(e["estimated_peak_bytes"] / GIB)
    for blocks, e in ((got[1], q), (got[3], lora)):  # the allocator's cache in: each stack reaches its peak
        assert sum(h for _, h, _ in blocks) == pytest.approx(e["measured_peak_bytes"] / GIB)
    assert sum(h for _, h, _ in got[4]) == pytest.approx(1.1 * card)
    assert {hatch for *_, hatch in got[4]} == {"//"}
    texts = {t.get_text(): t.get_position() for t in ax.texts}
    assert "396 GiB: does not fit in 140 GiB\n(drawn at 1/3 scale)" in texts
    assert texts["not measured:\ndoes not fit"][0] == pytest.approx(6.1)
    for label, e, x in (("estimate -3.9%", q, 0.5), ("estimate -0.3%", lora, 3.05)):
        top = max(e["estimated_peak_bytes"], e["measured_peak_bytes"]) / GIB
        assert texts[label] == pytest.approx((x, top + 0.06 * 1.25 * card))
    assert f"{q['measured_peak_bytes'] / GIB:.1f} GiB" in texts  # 38.3 over the measured bar
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend[0] == "NVIDIA H200 (140 GiB): 139.8 GiB" and len(legend) == 9  # the card and 8 categories drawn
    assert "held by the allocator in no tensor\n(estimated: its margin)" in legend


def test_a_cpu_figure_leaves_out_a_ram_line_that_would_squash_its_bars(tmp_path, monkeypatch):
    """SmolLM2 on CPU: the largest bar 2.35 GiB, the machine's 23.54 GiB RAM more than 2.5 x the axis: no line, the
    axis 1.25 x the largest bar."""
    r = report("smollm2_135m-cpu")
    ax = drawn(r, tmp_path, monkeypatch)
    largest = r["methods"]["full"]["measured_peak_bytes"] / GIB
    assert not ax.lines and ax.get_ylim() == pytest.approx((0, 1.25 * largest))


def test_a_streamed_bases_gathered_weights_are_drawn_in_its_bar(tmp_path, monkeypatch):
    """A base sharded over several GPUs, or streamed (train.stream_base), holds two layers gathered at a time: the
    estimate's gathered_weights. The figure left them out of the bar, which stopped short of the peak written over
    it."""
    r = report("llama8b-none")
    parts = r["methods"]["qlora"]["components"]
    parts["quantized_weights"], parts["gathered_weights"] = parts["quantized_weights"] - GIB, GIB
    ax = drawn(r, tmp_path, monkeypatch)
    qlora = r["methods"]["qlora"]  # the estimate's bar: its peak and the allocator's margin, as a card holds them
    assert sum(h for _, h, _ in stacks(ax)[0]) == pytest.approx(
        (qlora["estimated_peak_bytes"] + qlora["allocator_margin_bytes"]) / GIB)
    assert "gathered weights (sharded or streamed base)" in [t.get_text() for t in ax.get_legend().get_texts()]


def test_the_assumptions_say_what_the_estimate_counts_for_the_settings_given():
    """The report's assumptions and levers, each set off its default: on a CPU, NF4 without double quant in blocks
    of 128 (not the paper's 4.127 bits), layers kept by budget, fp32 adapters without masters, torch AdamW, no
    checkpointing, the loss whole, eager attention, no host allowance and no lever; on CUDA the 8B with the optimizer
    on the host, 8-bit moments and two layers kept, tiles for QLoRA and not for full fine-tuning, nor the levers
    QLoRA alone takes."""
    from qlora.memory.assumptions import assumptions, levers

    cpu = apply_overrides(load_recipe(ROOT / "recipes" / "tiny.py"), [
        "--quant.double_quant=false", "--quant.blocksize=128", "--quant.keep_16bit_budget=0.1",
        "--train.gradient_checkpointing=false", "--train.loss_chunk_size=0", "--train.optimizer=adamw"])
    said = assumptions(cpu, "qlora", "fp32", "cpu")
    assert said[0] == ("linear layers in NF4 in blocks of 128, but those chosen by quant.keep_16bit_budget=0.1 in "
                       "fp32, counted at the full budget; embeddings, lm_head, norms in fp32; adapters and their "
                       "gradients in fp32; torch AdamW (moments in the parameter dtype) over the adapters")
    assert said[2:4] == ["no gradient checkpointing: every layer keeps its activations",
                         "loss over all positions, fp32 logits; attention through SDPA's flash kernel, no s x s "
                         "matrix stored"]
    assert len(said) == 5 and said[4].startswith("CPU: weights and compute in fp32") and not levers(cpu, "qlora", "cpu")
    eager = apply_overrides(cpu, ["--model.attn_implementation=eager"])
    assert assumptions(eager, "qlora", "fp32", "cpu")[3].endswith("eager attention: every head's s x s scores "
                                                                  "stored, in fp32")

    cuda = apply_overrides(load_recipe(ROOT / "recipes" / "llama8b.py"), [
        "--train.plan=recipe", "--train.plan_batch=false", "--train.optimizer_on_cpu=true",
        "--train.optimizer=paged_adamw_8bit",
        "--quant.keep_16bit=model.layers.0.mlp.down_proj,model.layers.1.mlp.down_proj"])
    qlora, full = assumptions(cuda, "qlora", "bf16", "cuda"), assumptions(cuda, "full", "bf16", "cuda")
    assert qlora[0].startswith("linear layers in NF4 with double quant in blocks of 64, 4.127 bits per parameter "
                               "(QLoRA paper, sec. 3), but 2 kept in bf16 (quant.keep_16bit); embeddings, lm_head, "
                               "norms in bf16; adapters in bf16, with fp32 master copies and fp32 gradients")
    assert qlora[3] == full[3] == (
        "loss over chunks of 1024 positions, fp32 logits; attention through SDPA, no s x s matrix stored; its "
        "backward's buffers FlashAttention-2's, which writes dk and dv at every query head first (torch's on a card "
        "other than an H100/H200/B200, and the larger of the two where no card is at hand)")
    assert qlora[4].startswith("sequence tiles of 4096 tokens") and qlora[5:] == full[4:]
    # The host optimizer keeps fp32 masters of full fine-tuning's 16-bit weights (the estimate counts them there).
    assert full[0].endswith("bitsandbytes paged AdamW with 8-bit moments; fp32 master copies in host memory "
                            "(train.optimizer_on_cpu)")
    assert full[4].startswith("CUDA: the optimizer state, the fp32 masters and the update in host memory") and \
        "the allocator's margin, 4 T h e + 0.4 GiB" in full[4]
    assert full[5].startswith("host: 6 GiB allowed for the process itself and the OS") and len(full) == 6
    assert levers(cuda, "full", "cuda") == [
        "offload_activations: layer inputs in pinned host memory", "loss_chunk_size=1024: logits 1024 positions at a "
        "time", "optimizer_on_cpu: the optimizer state in host memory", "paged_adamw_8bit: 8-bit moments"]
    assert "embeddings_on_cpu: the input embeddings in host memory" in levers(cuda, "qlora", "cuda")
    cudnn = apply_overrides(cuda, ["--model.sdpa_backend=cudnn"])
    assert assumptions(cudnn, "qlora", "bf16", "cuda")[3].endswith(
        "cuDNN's, which sums dk and dv over the group in the kernel (model.sdpa_backend=cudnn)")
    on_card = apply_overrides(cudnn, ["--train.optimizer_on_cpu=false"])
    assert assumptions(on_card, "full", "bf16", "cuda")[0].endswith("8-bit moments; no fp32 master copy (as "
                                                                    "qlora.train runs it: mixed-precision trainers "
                                                                    "that keep one add 4 bytes per parameter)")


def test_the_plan_for_a_card_and_host_named_agrees_with_max_context_there(capsys):
    """--host-gib is one machine's size for --max-context and the plan alike (qlora.train weighs the memory it finds
    available, the host less the process's and the OS's allowance). At 177,152 tokens, the 70B recipe's longest on
    80 GiB with 128 GiB of host, the plan took --host-gib as available, 6 GiB more: 40 layer inputs on the host where
    --max-context keeps 39 and 1 on the card."""
    from qlora.memory.context import fit_context
    from qlora.report.memory import main

    fit = fit_context(load_recipe(ROOT / "recipes/llama70b.py"), 80 * GIB, 128 * GIB)
    assert fit.tokens == 177_152
    args = ["recipes/llama70b.py", "--methods=qlora", "--gpu-gib", "80", "--host-gib", "128", "--json"]
    assert main([*args, f"--data.max_seq_len={fit.tokens}"]) == 0
    r = json.loads(capsys.readouterr().out)
    qlora = r["methods"]["qlora"]
    assert qlora["checkpoints"] == fit.estimate.checkpoints.describe() and qlora["fits"]
    assert qlora["host_bytes"] == fit.estimate.host_bytes
    assert "--train.checkpoint_every=2" in fit.overrides and "--train.checkpoint_every=2" in r["plan"]["chose"]
    assert r["plan"]["host_gib"] == 128  # the record of the host it planned for


def test_a_step_the_host_cannot_hold_is_marked_as_the_trainer_refuses_it(capsys):
    """With --gpu-gib and --host-gib the report's "fits" is the trainer's check before loading (preflight.check_fits):
    the card and the host. The 70B recipe's own levers at 131,072 tokens keep every layer input on the host, 171 GiB
    against a host of 128: the card takes the step, qlora.train refuses it in one line, and the report said it fits.
    A host 2 GiB short of the estimate's host total (its 6 GiB for the process itself included) does not fit either."""
    import torch

    from qlora.errors import ConfigError
    from qlora.memory.preflight import available_on, check_fits
    from qlora.report.memory import main

    args = ["recipes/llama70b.py", "--methods=qlora", "--gpu-gib", "80", "--host-gib", "128", "--json",
            "--data.max_seq_len=131072", "--train.plan=recipe", "--train.plan_batch=false"]
    assert main(args) == 0
    out = capsys.readouterr()
    report = json.loads(out.out)
    qlora = report["methods"]["qlora"]
    assert qlora["host_bytes"] > 128 * GIB and not qlora["fits"]
    assert "[does not fit the host of 128.00 GiB]" in out.err
    assert f"**does not fit** (host {qlora['host_bytes'] / GIB:.2f} > 128.00 GiB)" in markdown(report, "r.png")
    cfg = apply_overrides(load_recipe(ROOT / args[0]), args[7:])
    with pytest.raises(ConfigError, match="host memory"):
        check_fits(cfg, torch.device("cuda"), device_bytes=80 * GIB, host_bytes=available_on(128 * GIB))
    assert main([*args[:5], "200", *args[6:]]) == 0  # a host that holds it: fits
    assert json.loads(capsys.readouterr().out)["methods"]["qlora"]["fits"]
    short = str(qlora["host_bytes"] // GIB - 2)  # holds what the plan keeps, not that beside the 6 GiB allowance
    assert main([*args[:5], short, *args[6:]]) == 0
    assert not json.loads(capsys.readouterr().out)["methods"]["qlora"]["fits"]


def test_over_several_gpus_the_plan_and_the_verdict_weigh_each_process_share_of_the_host(capsys):
    """qlora.train over several processes on one host: each plans for (plan.use_plan) and checks before loading
    (preflight.check_fits) its share of the host's available memory (preflight.host_share). The 8B recipe at 65,536
    tokens on cards of 24 GiB over 2 GPUs keeps its layer inputs in host memory: on a host whose available memory
    holds one process's once and a half, the report's per-GPU verdict weighed the whole host as each process's (it
    fits), and its plan left the host out. Both are each process's share now, as the trainer's: the step with the
    recipe's levers does not fit it (one process alone does), and the plan is the one use_plan makes of it."""
    import copy

    import torch

    from qlora.errors import ConfigError
    from qlora.memory.plan import plan_for
    from qlora.memory.preflight import available_on, check_fits, host_share, needs
    from qlora.memory.terms import HOST_RUNTIME
    from qlora.report.memory import main

    args = ["recipes/llama8b.py", "--methods=qlora", "--gpu-gib", "24", "--host-gib", "128", "--gpus", "2", "--json",
            "--data.max_seq_len=65536"]
    cfg = apply_overrides(load_recipe(ROOT / args[0]), args[9:])
    each = estimate(cfg, load_arch(cfg), "qlora", "cuda", 2)
    host_gib = (HOST_RUNTIME + 1.5 * needs(each)[1]) / GIB  # what it finds available holds it once and a half
    share = host_share(available_on(int(host_gib * GIB)), 2)[0]
    assert needs(each)[1] > share and needs(each)[1] <= available_on(int(host_gib * GIB))
    assert main([*args[:5], f"{host_gib}", *args[6:]]) == 0
    out = capsys.readouterr()
    r = json.loads(out.out)
    assert r["methods"]["qlora"]["host_fits"] is True  # one process has the whole host
    per = r["methods"]["qlora"]["per_gpu"]["data_parallel"]
    assert per["host_bytes"] == each.host_bytes and per["fits"] is False and per["host_fits"] is False
    assert f"data parallel {per['estimated_peak_bytes'] / GIB:.2f} GiB [does not fit the host of " \
           f"{int(host_gib * GIB) / GIB:.2f} GiB shared by 2 processes]" in out.err
    assert f"| {per['estimated_peak_bytes'] / GIB:.2f} (**does not fit** (host {per['host_bytes'] / GIB:.2f} > " \
           f"{int(host_gib * GIB) / GIB:.2f} GiB shared by 2 processes)) |" in markdown(r, "r.png")  # its table's cell
    with pytest.raises(ConfigError, match=r"host memory and this host has .* GiB available"):
        check_fits(cfg, torch.device("cuda"), 2, device_bytes=24 * GIB, host_bytes=share)
    # The plan: the one each process makes of its share (none fits this one), which its check then passes.
    for gib in (host_gib, 128):
        assert main([*args[:5], f"{gib}", *args[6:], "--train.plan=fastest"]) == 0
        r = json.loads(capsys.readouterr().out)
        assert r["plan"]["host_gib"] == gib  # the record of the host whose share it planned for
        share = host_share(available_on(int(gib * GIB)), 2)[0]
        planned = apply_overrides(copy.deepcopy(cfg), ["--train.plan=fastest"])
        plan, _ = plan_for(planned, "cuda", 24 * GIB, "a card of 24 GiB", (share, "a share"), 2)
        assert (plan is None) is (gib == host_gib) and r["plan"]["chose"] == (plan and planned.train.plan_chose)
        if plan is not None:
            assert f"shared by 2 processes: {share / GIB:.2f} GiB each" in r["plan"]["lines"][0]
            assert r["methods"]["qlora"]["per_gpu"]["data_parallel"]["fits"] is True
            assert check_fits(planned, torch.device("cuda"), 2, device_bytes=24 * GIB, host_bytes=share) is not None


def test_the_plan_keeps_an_offload_budget_the_command_line_sets(capsys):
    """qlora.train keeps a lever set on its command line (plan.keep_overridden): --train.offload_budget_gib was not
    among them, so the plan for 80 GiB and a host of 140 estimated every layer input it keeps on the host (119.56 GiB
    there) and then set the user's budget, which offloads 39 of the 40: the summary, and the run, 116.86 GiB."""
    from qlora.report.memory import main

    budget = "--train.offload_budget_gib=105.421875"
    assert main(["recipes/llama70b.py", "--methods=qlora", "--gpu-gib", "80", "--host-gib", "140", "--json",
                 "--data.max_seq_len=177152", budget]) == 0
    r = json.loads(capsys.readouterr().out)
    qlora = r["methods"]["qlora"]
    assert f"{qlora['host_bytes'] / GIB:.2f} GiB in host memory" in r["plan"]["lines"][0] and qlora["fits"]
    assert not any(o.startswith("--train.offload_budget_gib=") for o in r["plan"]["chose"])
    assert "  as set: train.offload_budget_gib=105.421875 (train.plan_keep)" in r["plan"]["lines"]
    assert r["settings"]["offload_budget_gib"] == 105.421875
    # A recipe's budget (not kept: the plan's to set) is set as the estimate had it: none, every input on the host.
    from qlora.memory.plan import plan_for
    from qlora.memory.preflight import available_on

    cfg = apply_overrides(load_recipe(ROOT / "recipes/llama70b.py"), ["--data.max_seq_len=177152", budget])
    plan, _ = plan_for(cfg, "cuda", 80 * GIB, "a card of 80 GiB", (available_on(140 * GIB), "a host"))
    assert estimate(cfg, load_arch(cfg), "qlora", "cuda").host_bytes == plan.estimate.host_bytes


def test_over_several_gpus_no_plan_is_shown_for_a_streamed_base_the_trainer_refuses(capsys):
    """qlora.train refuses train.stream_base over several processes before it plans (check_processes). The report
    for recipes/llama70b_24gb.py (a streamed base) over 2 GPUs of 24 GiB still planned, keeping the base streamed:
    "the step estimated at 12.88 GiB", one process's figure, beside its own per-GPU rows (stream_base off) of 44.42
    GiB data parallel and 27.75 base sharded, neither fitting. It says the trainer's refusal now; with the base not
    streamed, the plan's figure is the per-GPU row's."""
    import torch

    from qlora.errors import ConfigError
    from qlora.levers.stream_base.settings import check_processes
    from qlora.memory.preflight import available_on, check_fits
    from qlora.report.memory import main

    args = ["recipes/llama70b_24gb.py", "--methods=qlora", "--gpu-gib", "24", "--gpus", "2", "--json"]
    with pytest.raises(ConfigError) as refused:
        check_processes(load_recipe(ROOT / args[0]), 2)
    assert main(args) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["plan"]["chose"] is None and r["plan"]["lines"] == [
        f"train.plan=fastest: none, for qlora.train refuses the run before it plans: {refused.value}"]
    assert not r["methods"]["qlora"]["per_gpu"]["data_parallel"]["fits"]
    # Not streamed, the plan is made, and its figure is each process's as the per-GPU row and the check have it.
    assert main([*args[:3], "45", *args[4:], "--train.stream_base=false"]) == 0
    r = json.loads(capsys.readouterr().out)
    per = r["methods"]["qlora"]["per_gpu"]["data_parallel"]
    figure = per["estimated_peak_bytes"] + per["allocator_margin_bytes"]
    assert r["plan"]["chose"] and f"the step estimated at {figure / GIB:.2f} GiB" in r["plan"]["lines"][0]
    cfg = apply_overrides(load_recipe(ROOT / args[0]), ["--train.stream_base=false", *r["plan"]["chose"]])
    host = available_on(128 * GIB)  # --host-gib's default, as the trainer would find it
    assert check_fits(cfg, torch.device("cuda"), 2, device_bytes=45 * GIB, processes=2, available=host).card_bytes \
        == figure


def test_on_a_cpu_device_the_verdict_is_the_check_before_loadings(capsys, monkeypatch):
    """On a CPU device qlora.train's check counts the process's libraries and malloc's free lists beside the
    estimated tensors (preflight.process_margin). The report's verdict left them out: recipes/llama8b.py on the CPU,
    10.28 GiB of tensors and 17.97 GiB with them, "fits" a 16 GiB machine, which the trainer refuses it on. Both
    weigh 17.97 now, and the verdict names it."""
    import torch

    from qlora.errors import ConfigError
    from qlora.memory.preflight import check_fits, needs
    from qlora.report.memory import main

    args = ["recipes/llama8b.py", "--methods=qlora", "--train.device=cpu", "--json"]
    cfg = apply_overrides(load_recipe(ROOT / args[0]), args[2:3])
    est = estimate(cfg, load_arch(cfg), "qlora", "cpu")
    for machine, fits in ((needs(est)[0], True), (needs(est)[0] - 1, False), (est.card_bytes, False)):
        monkeypatch.setattr("qlora.report.contents.total_bytes", lambda machine=machine: machine)
        assert main(args) == 0
        out = capsys.readouterr()
        entry = json.loads(out.out)["methods"]["qlora"]
        assert entry["fits"] is fits and ("[does not fit]" in out.err) is not fits
        try:  # the trainer's check on such a machine, all of it available
            check_fits(cfg, torch.device("cpu"), available=machine)
            refused = False
        except ConfigError:
            refused = True
        assert refused is not fits
    assert f"**does not fit** ({needs(est)[0] / GIB:.2f} GiB with the process's libraries and free lists > " \
           f"{est.card_bytes / GIB:.2f} GiB)" in markdown(json.loads(out.out), "r.png")
