"""The memory report as markdown, and its few-line console summary."""

from __future__ import annotations

GIB = 2**30
LABELS = {"quantized_weights": "quantised base weights (NF4 + quant state)",
          "unquantized_weights": "unquantised weights (embeddings, lm_head, norms; every weight for full/lora)",
          "gathered_weights": "weights all-gathered for the moment (several GPUs, base sharded)",
          "adapters": "LoRA adapters", "gradients": "gradients", "optimizer_state": "optimizer state",
          "activations": "activations and temporaries (measured: the rest)", "cuda_context": "CUDA context"}
METHOD_NAMES = {"full": "full fine-tuning", "lora": "LoRA, 16-bit base", "qlora": "QLoRA, NF4 + double quant"}


def gib(n: int | None) -> str:
    return "–" if n is None else f"{n / GIB:,.3f}" if n < GIB else f"{n / GIB:,.2f}"


def _verdict(entry: dict, report: dict) -> str:
    if entry["fits"]:
        return "fits"
    card = _weighed(entry)
    beside = " GiB with the process's libraries and free lists" if entry.get("process_margin_bytes") else ""
    over = [f"{gib(card)}{beside} > {gib(report['device_memory_bytes'])} GiB"] if card > report["device_memory_bytes"] \
        else []
    if entry.get("host_fits") is False:
        over.append(f"host {gib(entry['host_bytes'])} > {gib(report['host_memory_bytes'])} GiB{_shared(entry)}")
    return f"**does not fit** ({'; '.join(over)})"


def _mark(entry: dict, report: dict) -> str:
    """The summary's mark: none where the step fits, else what it does not fit (the host named)."""
    if entry["fits"]:
        return ""
    if entry.get("host_fits") is not False:
        return " [does not fit]"
    card = _weighed(entry) > report["device_memory_bytes"]
    return f" [does not fit {'the card nor ' if card else ''}the host of {gib(report['host_memory_bytes'])} GiB" \
           f"{_shared(entry)}]"


def _weighed(entry: dict) -> int:
    """What `fits` weighed against the device: the peak with the allocator's margin (CUDA) or the process's (CPU,
    preflight.process_margin; absent from reports written before it was counted)."""
    return entry["estimated_peak_bytes"] + (entry.get("allocator_margin_bytes") or 0) + \
        entry.get("process_margin_bytes", 0)


def _shared(entry: dict) -> str:
    """Of a process of several on the host: each weighs its share of it (preflight.host_share)."""
    return f" shared by {n} processes" if (n := entry.get("host_shared_by")) else ""


def model_name(model: str) -> str:
    """A hub id as is; a local checkpoint by its folder name (no machine's paths in a committed report)."""
    return model.rstrip("/").rsplit("/", 1)[-1] if model.startswith(("/", "~", ".")) else model


def summary_lines(report: dict) -> list[str]:
    s = report["settings"]
    out = [f"{model_name(report['model'])} | {s['batch_size']} x {s['seq_len']} tokens | estimate for "
           f"{report['estimate_for']} | measured on {report['device']}"]
    for method, e in report["methods"].items():
        measured = e.get("measured_peak_bytes")
        vs = f", measured {gib(measured)} GiB (estimate {100 * e['error']:+.1f}%)" if measured else \
            (f", {e['measure_error']}" if e.get("measure_error") else "")
        host = f", host {gib(e['host_bytes'])} GiB" if e.get("host_bytes") else ""
        margin = e.get("allocator_margin_bytes") or 0
        card = f", {gib(e['estimated_peak_bytes'] + margin)} GiB with the allocator's margin" if margin else ""
        out.append(f"  {method:5s} estimated {gib(e['estimated_peak_bytes'])} GiB "
                   f"({e['estimated_peak_bytes'] / 1e9:,.1f} GB){card}{host}{vs}{_mark(e, report)}")
        if e.get("streamed"):
            out.append(f"        base streamed: {e['streamed']}")
        if "per_gpu" in e:
            out.append(f"        on {report['gpus']} GPUs, per GPU: " + ", ".join(
                f"{CASES[case]} {gib(c['estimated_peak_bytes'])} GiB{_mark(c, report)}"
                for case, c in e["per_gpu"].items()))
    return out


def markdown(report: dict, png_name: str) -> str:
    s, methods = report["settings"], report["methods"]
    measured = report["measured"] and any(e.get("measured_peak_bytes") for e in methods.values())
    lines = [f"# Memory budget: `{report['recipe']}` ({model_name(report['model'])})", ""]
    if not measured:
        lines += [f"> **Estimate only: nothing here was measured.** Device: none. The estimate is for "
                  f"{'one CUDA GPU' if report['estimate_for'] == 'cuda' else 'CPU'} "
                  f"({s['compute_dtype']} compute), from `{report['config_json']}` and the recipe alone.", ""]
    lines += [f"- device: {report['device']}" + (f" (measured); drawn against {report['device_memory']}" if measured
                                                 else f"; drawn against {report['device_memory']}"),
              f"- date: {report['date']}",
              "- versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
              f"- command: `{report['command']}`",
              f"- shape: batch {s['batch_size']} x {s['seq_len']} tokens of random ids, every position a target; "
              f"LoRA r={s['lora_r']} alpha={s['lora_alpha']:g} dropout={s['lora_dropout']:g} on "
              f"{','.join(s['lora_targets'])}; {s['optimizer']}; gradient checkpointing "
              f"{'on' if s['gradient_checkpointing'] else 'off'}; loss chunk "
              f"{s['loss_chunk_size'] or 'off'}; compute {s['compute_dtype']}",
              f"- 4-bit base (qlora): blocks of {s.get('blocksize', 64)}; " + (
                  f"{s['keep_16bit']} linear layers kept in 16-bit (quant.keep_16bit)" if s.get("keep_16bit") else
                  f"the most sensitive layers in 16-bit within {100 * s['keep_16bit_budget']:g}% more base weights, "
                  "counted in full (quant.keep_16bit_budget)" if s.get("keep_16bit_budget") else
                  "every linear layer but the head in 4-bit"), "",
              f"![peak memory by method and category]({png_name})", "",
              "| method | estimated peak GiB (GB) | host memory besides, GiB | measured peak GiB | estimate vs measured"
              " | on the device |", "|---|---|---|---|---|---|"]
    for m, e in methods.items():
        got = e.get("measured_peak_bytes")
        error = f"{100 * e['error']:+.1f}%" if got else "–"
        lines.append(f"| {METHOD_NAMES[m]} | {gib(e['estimated_peak_bytes'])} ({e['estimated_peak_bytes'] / 1e9:,.1f})"
                     f" | {gib(e['host_bytes']) if e.get('host_bytes') else '–'}"
                     f" | {gib(got) if got else e.get('measure_error', 'not measured')} | {error} | "
                     f"{_verdict(e, report)} |")
    margins = [e.get("allocator_margin_bytes") for e in methods.values()]
    if measured:
        lines += ["", f"**Measured** means: {report['measurement']}. Peak over the training phases (first forward, "
                      "backward, optimizer step, steady state); loading is listed apart." +
                  (" The estimate set against it is the peak with the allocator's margin." if any(margins) else "")]
    if report.get("plan"):
        lines += ["", "## The plan", "", "The recipe leaves its levers to the trainer (train.plan=fastest); for this "
                  "card it chooses as follows, and every method above is estimated with that choice.", "", "```",
                  *report["plan"]["lines"], "```"]
    cache = [(e.get("measured_components") or {}).get("allocator_cache") for e in methods.values()]
    lines += ["", "## Components", "", "GiB at each method's estimated peak; measured columns break the measured peak "
              "down by the tensors alive at that phase's end, the rest being activations and temporaries" +
              (", and what the allocator held in no tensor." if any(cache) else "."), "",
              "| component | " + " | ".join(f"{m} est." + (f" | {m} meas." if measured else "") for m in methods)
              + " |", "|---|" + "---|" * (len(methods) * (2 if measured else 1))]
    for cat, label in LABELS.items():
        row = []
        for e in methods.values():
            row.append(gib(e["components"].get(cat, 0)))
            if measured:
                row.append(gib((e.get("measured_components") or {}).get(cat)) if e.get("measured_components") else "–")
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    held = [(e.get("measured_components") or {}).get("tokenised_rows") for e in methods.values()]
    counted = [e["components"].get("tokenised_rows") for e in methods.values()]  # a CPU estimate's, from file sizes
    if any(counted) or measured and any(held):  # a CPU peak is host memory, the rows part of it
        lines.append(f"| tokenised rows (host memory{'' if any(counted) else ', measured only'}) | " + " | ".join(
            (gib(c) if c else "–") + (f" | {gib(n)}" if measured else "") for c, n in zip(counted, held, strict=True))
            + " |")
    if any(margins) or any(cache):  # measured: the card's peak less what its tensors and the context hold
        cells = [gib(m) + (f" | {gib(c)}" if measured else "") for m, c in zip(margins, cache, strict=True)]
        lines.append("| *beside the peak: the allocator's margin" +
                     (" (measured: held by the allocator in no tensor)" if measured else "") + "* | " +
                     " | ".join(cells) + " |")
    if any(margins):
        lines += ["", "The allocator's margin: " + next(e["allocator_margin_formula"] for e in methods.values()) +
                  "; a card must hold the peak and the margin."]
    if report.get("gpus"):
        lines += _several_gpus(report)
    lines += _formulas(report)
    if measured:
        lines += _phases(methods)
    return "\n".join(lines) + "\n"


CASES = {"data_parallel": "data parallel", "shard_base": "base sharded"}


def _several_gpus(report: dict) -> list[str]:
    n, methods = report["gpus"], {m: e for m, e in report["methods"].items() if "per_gpu" in e}
    lines = ["", f"## On {n} GPUs, per GPU (estimated)", "",
             f"`torchrun --nproc-per-node={n} -m qlora.train RECIPE.py`: data parallel holds the whole model on each "
             f"GPU; `--train.shard_base=true` shards the frozen base over the {n} (FSDP2), each GPU all-gathering two "
             "decoder layers, or the head, at a time. Same batch per GPU as above.", "",
             f"| method | 1 GPU | {n} GPUs, data parallel | {n} GPUs, base sharded |", "|---|---|---|---|"]
    for m, e in methods.items():
        cells = [f"{gib(c['estimated_peak_bytes'])} ({_verdict(c, report)})" if (c := e["per_gpu"].get(case)) else
                 "– (full fine-tuning trains every weight)" for case in CASES]
        lines.append(f"| {METHOD_NAMES[m]} | {gib(e['estimated_peak_bytes'])} | " + " | ".join(cells) + " |")
    sharded = {m: e["per_gpu"]["shard_base"] for m, e in methods.items() if "shard_base" in e["per_gpu"]}
    if sharded:
        lines += ["", "GiB per GPU with the base sharded:", "",
                  "| component | " + " | ".join(sharded) + " |", "|---|" + "---|" * len(sharded)]
        lines += [f"| {label} | " + " | ".join(gib(c["components"].get(cat, 0)) for c in sharded.values()) + " |"
                  for cat, label in LABELS.items()]
    return lines


def _formulas(report: dict) -> list[str]:
    a = report["arch"]
    out = ["", "## How each estimate is made", "",
           f"Symbols: L={a['layers']} layers, h={a['hidden']}, i={a['intermediate']}, nh={a['heads']} heads "
           f"({a['kv_heads']} kv, head_dim {a['head_dim']}), V={a['vocab']}, P={a['params']:,} parameters of which "
           f"P_lin={a['linear_params']:,} in linear layers; b={report['settings']['batch_size']}, "
           f"s={report['settings']['seq_len']}, T=b*s, N=b*(s-1); e = bytes per element of the compute dtype.", ""]
    for m, e in report["methods"].items():
        out += [f"### {METHOD_NAMES[m]}", "", f"Peak moment: {e['estimated_peak_phase']} (candidates, GiB: "
                + ", ".join(f"{k} {gib(v)}" for k, v in e["estimated_phases"].items()) + ").", "",
                "| component | GiB | formula |", "|---|---|---|"]
        for cat, formula in e["formulas"].items():
            out.append(f"| {cat} | {gib(e['components'].get(cat)) if cat in e['components'] else ''} | {formula} |")
        if e.get("host"):
            out += ["", f"Host memory beside the device: {gib(e['host_bytes'])} GiB.", "",
                    "| host | GiB | formula |", "|---|---|---|"]
            out += [f"| {k} | {gib(v)} | {e['host_formulas'].get(k, '')} |" for k, v in e["host"].items()]
        if e.get("levers") or e.get("checkpoints"):
            out += ["", "Memory levers: " + "; ".join((e.get("levers") or []) + (
                [f"where the layer inputs wait: {e['checkpoints']}"] if e.get("checkpoints") else [])) + "."]
        out += [""] + [f"- {x}" for x in e["assumptions"]] + [""]
    return out


def _phases(methods: dict) -> list[str]:
    names = []
    for e in methods.values():
        names += [p for p in (e.get("measured_phases") or {}) if p not in names]
    out = ["## Measured phases", "", "Peak of each phase in GiB (each phase's peak counter is reset when it starts).",
           "", "| phase | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for p in names:
        out.append(f"| {p} | " + " | ".join(gib((e.get("measured_phases") or {}).get(p)) for e in methods.values())
                   + " |")
    return out


def _row_note(row: dict, report: dict) -> str:
    if not row["tokens"] and row["limit"] == "host":
        return f"the host would need {gib(report['fixed_host_bytes'])} GiB even at {report['granularity']:,} tokens"
    if not row["tokens"]:
        return f"weights, adapters and context alone take {gib(report['fixed_bytes'])} GiB" + (
            "; --train.stream_base=true keeps the 4-bit base in host memory" if report.get("streamable") else "")
    return ("the search ends there; " if row["limit"] == "search" else "") + \
        f"{gib(row['card_bytes'])} GiB on the card with the allocator's margin, {gib(row['host_bytes'])} GiB of host"


def context_lines(report: dict) -> list[str]:
    """The --max-context answer in a few lines: one per card size, then the levers."""
    out = [f"{model_name(report['model'])} ({report['method']}, r={report['lora_r']}, batch {report['batch_size']}): "
           f"longest context per card, estimated for CUDA from config.json alone (no GPU used); host "
           f"{report['host_gib']:g} GiB"]
    for row in report["rows"]:
        out.append(f"  {row['gpu_gib']:>5g} GiB card: {row['tokens']:>9,} tokens, limited by the {row['limit']} "
                   f"({_row_note(row, report)})" + (f"; {row['checkpoints']}" if row.get("checkpoints") else ""))
        if row["tokens"]:
            out.append(f"      train it with: {' '.join(row['overrides'])}")
        if row.get("streamed"):
            out.append(f"      base streamed: {row['streamed']['describe']}")
    out.append("  levers: " + ("; ".join(report["levers"]) if report["levers"] else "none"))
    return out


def context_markdown(report: dict) -> str:
    rows = report["rows"]
    lines = [f"# Longest context: `{report['recipe']}` ({model_name(report['model'])})", "",
             "> **Estimate only: nothing here was measured.** Device: none. For one CUDA GPU per row (bf16 compute) "
             f"and {report['host_gib']:g} GiB of host memory, from `{report['config_json']}` and the recipe alone.",
             "", f"- date: {report['date']}",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
             f"- command: `{report['command']}`",
             f"- shape: batch {report['batch_size']}, {report['method']} with LoRA r={report['lora_r']} on "
             f"{','.join(report['lora_targets'])}; lengths in steps of {report['granularity']} tokens"
             + (f" (of {fine} where none fits)" if (fine := report.get("fine_granularity")) else ""), "",
             "| card | longest context (tokens) | limited by | on the card GiB (with the allocator's margin) | "
             "host GiB | layer inputs | to train it |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        if row["tokens"]:
            lines.append(f"| {row['gpu_gib']:g} GiB | {row['tokens']:,} | {row['limit']} | "
                         f"{gib(row['device_bytes'])} ({gib(row['card_bytes'])}) | {gib(row['host_bytes'])} | "
                         f"{row['checkpoints'] or '–'} | "
                         f"`{' '.join(row['overrides'])}` |")
        else:
            lines.append(f"| {row['gpu_gib']:g} GiB | 0 | {row['limit']}: {_row_note(row, report)} | – | – | – | – |")
    if any(row["limit"] == "host" for row in rows):
        lines += ["", "Limited by host: a larger host would hold every layer input, and the card would take a longer "
                  "row."]
    lines += ["", "## Levers", "", "The recipe's, as it sets them; where layer inputs wait is chosen per row above.",
              ""] + [f"- {x}" for x in report["levers"] or ["none"]]
    lines += ["", "## Assumptions", ""] + [f"- {x}" for x in report["assumptions"]]
    return "\n".join(lines) + "\n"
