"""Where a model is put together: the base loaded, adapters attached, checkpointing and the levers switched on. One
path for a run about to train (`build_model`, `prepare`) and for a finished run read back from its directory
(`load_run`), so eval, generate, merge and export see the model training saw.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import PreTrainedTokenizerBase

from qlora.adapters.loftq import apply_shifts, init_loftq, load_shifts
from qlora.adapters.lora import ADAPTER_CONFIG, attach_lora, read_adapter_config, trained_dtype
from qlora.base.attention import by_document, cuda_kernel, use_kernel
from qlora.base.bnb import bnb
from qlora.base.build import config_sha256
from qlora.base.load import compute_dtype, load_base, resolve_device
from qlora.base.sliding_window import configured_window
from qlora.config import Config, read_config_json
from qlora.config.model import FP16_ON_CUDA
from qlora.data.batches import check_positions, check_step_rows
from qlora.data.files import rows_sha256
from qlora.data.pack import check_packing, pack_examples, packing_summary
from qlora.data.splits import load_splits, read_splits, training_rows_at_most
from qlora.data.tokens import held_bytes, held_line
from qlora.errors import ConfigError
from qlora.levers import apply as levers
from qlora.levers import in_effect
from qlora.levers.cpu_embeddings.embedding import CPUEmbedding
from qlora.memory.preflight import this_host
from qlora.memory.profiler import PhaseTracker
from qlora.training import checkpoint, distributed
from qlora.training.restore import require_weights, unrecorded
from qlora.training.runconfig import MOVABLE, check_recorded
from qlora.training.rundir import lock_holder
from qlora.training.sensitivity import keep_sensitive_layers


def checkpoint_every_layer(model: torch.nn.Module) -> None:
    """transformers' activation checkpointing on every decoder layer, non-reentrant: it works with a frozen base whose
    inputs need no grad, and keeps dropout's RNG on recompute."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5.23 renamed it; 5.17 has the old name
        model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def load_model(cfg: Config, device: torch.device,
               place: torch.device | None = None) -> tuple[torch.nn.Module, PreTrainedTokenizerBase, str]:
    """The base as the run holds it: loaded (qlora/base/load.py; `place`: where, when not `device`; a lever may keep
    it off the device too, to bring it there itself), then stored as the levers that act at load time say (an NF4
    head, the input embeddings in host memory)."""
    model, tokenizer, path = load_base(cfg, device, place or levers.base_place(cfg, device))
    levers.at_load(model, cfg, place or device, compute_dtype(cfg.quant, device))
    return model, tokenizer, path


def attach_adapters(model: torch.nn.Module, cfg: Config, base_path: str, dtype: torch.dtype,
                    run_dir: Path | None) -> None:
    """What trains, on the base as loaded: LoRA adapters on the targeted layers, or every weight (quant.method=full).
    `run_dir`: a run that saved LoftQ shifts (lora.loftq_iters > 1), whose base they rebuild first as the run
    quantised it; None for a run about to start."""
    if run_dir is not None and cfg.quant.method == "qlora" and cfg.lora.init == "loftq" and cfg.lora.loftq_iters > 1:
        apply_shifts(model, cfg, base_path, load_shifts(run_dir))
    if cfg.quant.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        attach_lora(model, cfg.lora, dtype)


def build_model(cfg: Config, profiler: PhaseTracker | None = None, resuming: bool = False,
                ranks: distributed.Ranks | None = None) -> dict:
    """Load the base, attach adapters, switch on checkpointing and the memory and speed levers the recipe asks for;
    with several processes, shard the base (train.shard_base)."""
    ranks = ranks or distributed.Ranks()
    torch.manual_seed(cfg.train.seed)
    check_packing(cfg)
    device = ranks.device if ranks.several else resolve_device(cfg.train.device)
    dtype = compute_dtype(cfg.quant, device)
    if dtype == torch.float16 and device.type == "cuda":
        raise ConfigError(FP16_ON_CUDA)
    use_kernel(cfg, device)
    if speed := in_effect(cfg, cfg.quant.method, device.type, "speed"):  # said before a load of minutes
        print("speed levers: " + "; ".join(speed))
    model, tokenizer, base_path = load_model(cfg, device, place=ranks.base_place(cfg))
    if profiler is not None:
        profiler.watch(model)
        profiler.mark("loaded")
    if cfg.train.gradient_checkpointing:
        checkpoint_every_layer(model)
    if cfg.quant.method == "qlora" and cfg.quant.keep_16bit_budget and not cfg.quant.keep_16bit:
        # Chosen when the run starts; run_config.json records the choice for eval, generate, merge and --resume.
        cfg.quant.keep_16bit = keep_sensitive_layers(model, cfg, tokenizer, base_path, dtype, resuming)
    shifts = {}
    attach_adapters(model, cfg, base_path, dtype, Path(cfg.output.dir) if resuming else None)
    if cfg.quant.method != "full" and cfg.lora.init == "loftq" and not resuming:  # resumed adapters: the checkpoint's
        held, shifts = init_loftq(model, cfg, base_path)
        print(f"lora.init=loftq: after {cfg.lora.loftq_iters} step(s) at rank {cfg.lora.r}, base and adapters "
              f"remove {100 * held:.1f}% of the plain NF4 rounding error (squared norm)")
    # Each of the run's processes on this host pins its own buffers: each weighs its share (this_host), as the check
    # before loading did; weighing the whole, two processes could each pin what the host holds once.
    levers.on_model(model, cfg, device, dtype, this_host(ranks.local_size))
    levers.on_complete(model, cfg, device, dtype)
    ranks.distribute(model, cfg, device)
    if profiler is not None:
        profiler.mark("lora_attached")
    return dict(model=model, tokenizer=tokenizer, base_path=base_path, device=device, dtype=dtype, loftq_shifts=shifts)


def prepare(cfg: Config, profiler: PhaseTracker | None = None, resuming: bool = False,
            ranks: distributed.Ranks | None = None) -> dict:
    """Read the data, load the base, attach adapters, tokenise the data: everything the loop needs, as one dict."""
    read = read_splits(cfg.data)  # first: a missing file or a bad line is said before a load of minutes
    # data.train's and data.eval's rows as read (a held-out split carved by seed: in data.train's), for same_rows
    sha = [rows_sha256(read[1]), rows_sha256(read[2]) if read[2] is not None else None]
    if ranks is not None:
        ranks.check_same({key: f"{len(rows)} rows of sha256 {digest[:12]}" for key, rows, digest in
                          zip(("data.train", "data.eval"), read[1:], sha, strict=True) if rows is not None},
                         "give every process the same data files")
    # A step past the training rows, refused before a load of minutes (the rows' exact count is checked once
    # tokenised and packed: train.py)
    check_step_rows(cfg.train.batch_size, cfg.train.grad_accum, training_rows_at_most(cfg.data, read),
                    ranks.size if ranks is not None else 1)
    run = build_model(cfg, profiler, resuming, ranks)
    train_rows, eval_rows = load_splits(cfg.data, run["tokenizer"], cfg.train.seed, read)
    check_positions(run["model"].config, train_rows + eval_rows)  # before packing: each document's own positions
    run["rows_sha256"] = sha
    run["config_json_sha256"] = config_sha256(cfg.model.config_json) if cfg.model.synthetic else None  # its base's
    del read
    if cfg.data.pack:  # held-out rows stay unpacked: exact match is scored per row
        packed = pack_examples(train_rows, cfg.data.max_seq_len)
        print(packing_summary(train_rows, packed, cfg.data.max_seq_len))
        train_rows = packed
    if profiler is not None:  # on CPU the rows are part of the measured peak: named there, not left in "the rest"
        profiler.watch(rows_bytes=held_bytes(train_rows) + held_bytes(eval_rows))
    return dict(**run, train_rows=train_rows, eval_rows=eval_rows)


def print_summary(cfg: Config, run: dict, processes: int = 1) -> None:
    """Derived quantities, once, before the first step."""
    model, t = run["model"], cfg.train
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # A 4-bit weight is stored packed (two to a byte), so count its elements from the quant state's shape, which a
    # sharded one keeps on its module (qlora/base/shard.py).
    packed = {id(m.weight): m.quant_state.shape for m in model.modules() if getattr(m, "quant_state", None) is not None}
    total = sum(packed.get(id(p), getattr(getattr(p, "quant_state", None), "shape", p)).numel()
                for p in model.parameters())
    # model.embeddings_on_cpu keeps the table as a plain attribute, no parameter: it is still the model's
    total += sum(m.weight.numel() for m in model.modules() if isinstance(m, CPUEmbedding))
    mean_len = sum(len(r["input_ids"]) for r in run["train_rows"]) / len(run["train_rows"])
    longest = max(len(r["input_ids"]) for r in run["train_rows"])
    print(f"device {run['device']} | compute {str(run['dtype']).removeprefix('torch.')} | method {cfg.quant.method}")
    if run["device"].type == "cuda" and cfg.model.attn_implementation == "sdpa":
        # a sliding window shorter than the rows runs in blocks with a mask, which FlashAttention-2 does not take
        window = configured_window(model.config)
        masked = window is not None and longest > window
        kernel = {"cudnn": "cuDNN's attention", "flash": "FlashAttention-2",
                  "efficient": "the memory-efficient kernel"}[cuda_kernel(cfg, masked)]
        why = "a sliding window shorter than the rows, in blocks with a mask; not measured on a GPU" if masked else \
            "packed rows, document by document" if by_document(cfg) else "model.sdpa_backend" \
            if cfg.model.sdpa_backend != "auto" else "torch picks it on this card"
        print(f"attention: SDPA through {kernel} ({why})")
    print(f"trainable {trainable:,} of {total:,} parameters ({100 * trainable / total:.3f}%)")
    paged = t.optimizer.startswith("paged") and run["device"].type == "cpu"
    print(f"optimizer {t.optimizer}{': on CPU nothing pages (bitsandbytes pages CUDA memory only)' if paged else ''}")
    rows = t.batch_size * t.grad_accum * processes
    print(f"{t.batch_size} rows x {t.grad_accum} accum{f' x {processes} processes' if processes > 1 else ''} = "
          f"{rows} rows/step, about {rows * mean_len:,.0f} tokens/step (mean row {mean_len:.0f} tokens, longest "
          f"{longest} of max_seq_len {cfg.data.max_seq_len}); {len(run['train_rows'])} train rows, "
          f"{len(run['eval_rows'])} held out")
    print(f"tokenised rows in host memory: {held_line(run['train_rows'], run['eval_rows'])}")
    if t.warmup_steps >= t.steps:  # the schedule's warmup: lr (step + 1) / (warmup_steps + 1) of train.lr
        print(f"train.warmup_steps={t.warmup_steps} is not shorter than the run's {t.steps} steps: the learning rate "
              f"rises to {t.steps / (t.warmup_steps + 1):.1%} of train.lr={t.lr:g} and never decays")


def read_run_config(run_dir: Path) -> Config:
    """The recipe a run trained with, from RUN_DIR/run_config.json (or its parent's, for RUN_DIR/checkpoint-N)."""
    if run_dir.is_file():  # its folder's run_config.json was found, then the adapter "not found" beside the file
        raise ConfigError(f"RUN_DIR {run_dir} is a file: pass the training output directory it lies in (the "
                          "--output.dir of python -m qlora.train), or one of its checkpoint-N")
    # The parent only for a folder that is there (a checkpoint-N): a mistyped one is not found, not "not finished".
    candidates = (d / checkpoint.RUN_CONFIG for d in (run_dir, run_dir.parent) if run_dir.is_dir())
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise ConfigError(f"{run_dir / checkpoint.RUN_CONFIG} not found: RUN_DIR must be a training output directory "
                          "(the --output.dir of python -m qlora.train)")
    if path.parent != run_dir and run_dir.name.startswith("."):  # .tmp-checkpoint-N, .tmp-final: a kill left it
        raise ConfigError(f"{run_dir} is a folder the trainer writes before it renames it (a kill left it half "
                          f"written), not a checkpoint: pass {run_dir.parent} or one of its checkpoint-N")
    if path.parent == run_dir and (pid := lock_holder(run_dir)) is not None:
        # Its final weights are written as it ends: until then none, or those of an earlier end (a run extended).
        newest = checkpoint.checkpoint_dirs(run_dir)
        use = f"pass {newest[-1]} to use its newest checkpoint" if newest else "wait for its first checkpoint"
        raise ConfigError(f"{run_dir} is being trained now (pid {pid}): its final weights are not where it has got "
                          f"to; {use}, or wait for the run to end")
    cfg = read_config_json(path)
    # edited since its checkpoints were written: another base, another split (data.eval, moved, may be pointed at)
    if check_recorded(cfg, path, run_dir, movable=(*MOVABLE, "data.train", "data.eval"))[0] is None and \
            (why := unrecorded(run_dir)):  # said, not skipped in silence: an edit besides would go unnoticed
        print(f"{path} is not checked against the settings the run's checkpoint records: {why}")
    # Extended by --resume and stopped (kill -9, a signal, an error) before it ended again: its final weights are the
    # earlier end's, as while it trained, which the lock no longer tells. Weights of no recorded step (written before
    # it was) are taken for the earlier end's where the newest checkpoint is short of train.steps. Any checkpoint-N,
    # whole or not (one that lost its optimizer.pt, which eval never reads, was passed over for an earlier one's step).
    newest = checkpoint.checkpoint_dirs(run_dir) if path.parent == run_dir else []
    weights = run_dir / checkpoint.weights_file(cfg)
    if newest and weights.is_file():
        at, last = checkpoint.weights_step(weights), int(checkpoint.PATTERN.match(newest[-1].name)[1])
        if at < last if at is not None else last < cfg.train.steps:
            raise ConfigError(f"{run_dir} was extended past its {weights.name} (of an earlier end) and stopped at "
                              f"{newest[-1].name}: pass {newest[-1]} to use its newest checkpoint, or continue the "
                              "run with --resume to write its weights")
    return cfg


def read_run_adapter_config(run_dir: Path, cfg: Config) -> dict:
    """RUN_DIR/adapter_config.json, checked against the run's own lora.r and lora.alpha: PEFT and a merge read the
    adapter's scaling there, the model here, so an edited one would scale the update otherwise than it trained."""
    adapter = read_adapter_config(run_dir)
    if (adapter["r"], adapter["lora_alpha"]) != (cfg.lora.r, cfg.lora.alpha):
        raise ConfigError(f"{run_dir / ADAPTER_CONFIG} says r={adapter['r']}, lora_alpha={adapter['lora_alpha']} "
                          f"but run_config.json lora.r={cfg.lora.r}, lora.alpha={cfg.lora.alpha}: restore the "
                          "one that was edited (the checkpoint-N directories hold copies)")
    return adapter


def load_run(run_dir: Path, device: str | None = None, compute: str | None = None, method: str | None = None,
             base_path: str | None = None, cfg: Config | None = None,
             ) -> tuple[Config, torch.nn.Module, PreTrainedTokenizerBase, torch.device]:
    """Rebuild a run's trained model in eval mode: its base as it trained (NF4 for qlora), adapters loaded.

    `device`, `compute` (a quant.compute_dtype), `method` (qlora or lora: the same adapter on a 4-bit or a 16-bit
    base) and `base_path` (another copy of the base) override the run's own settings. `cfg`: the run's config as
    read_run_config read it already (what the caller checked is what loads); those change a copy of it, returned, so
    that a caller loading the run twice (merge's check, on two bases) starts each load from the run's own settings.
    """
    run_dir = Path(run_dir)
    cfg = copy.deepcopy(cfg) if cfg is not None else read_run_config(run_dir)
    asked = "--device=cuda" if device else f"{run_dir} trained with train.device=cuda,"
    dev = resolve_device(device or cfg.train.device, asked, "pass --device=cpu (or auto)")  # before any loading
    if device is not None:
        cfg.train.device = device
    if compute is not None:
        cfg.quant.compute_dtype = compute
    if method is not None:
        cfg.quant.method = method
        cfg.quant.quantize_lm_head &= method == "qlora"  # a 16-bit base keeps its 16-bit head
    if base_path is not None:
        cfg.model.path, cfg.model.build = base_path, None
    weights = checkpoint.weights_file(cfg)
    require_weights(run_dir, weights)
    if cfg.quant.method != "full":
        read_run_adapter_config(run_dir, cfg)
    model, tokenizer, path = load_model(cfg, dev)
    attach_adapters(model, cfg, path, compute_dtype(cfg.quant, dev), run_dir)
    try:
        checkpoint.load_weights(model, cfg, run_dir)  # checks names, shapes and values against the base
    except Exception as err:  # another rank or base than run_config.json says, a damaged file (SafetensorError), nan
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if isinstance(err, SafetensorError):  # cut short or overwritten: no other base or run would read it either
            raise ConfigError(f"{run_dir / weights} is unreadable ({reason}): restore it from the run (its "
                              "checkpoint-N directories hold copies)") from err
        raise ConfigError(f"{run_dir / weights} does not fit the run's base {cfg.model.path} ({reason}): pass the "
                          "run directory that wrote it, untouched") from err
    levers.on_complete(model, cfg, dev, compute_dtype(cfg.quant, dev))
    model.eval()
    return cfg, model, tokenizer, dev


def load_run_fp32(run_dir: Path, method: str | None = None, base_path: str | None = None, cfg: Config | None = None,
                  ) -> tuple[Config, torch.nn.Module, PreTrainedTokenizerBase, torch.device]:
    """The run as it trained, computing in fp32 on the CPU: its base loaded, and quantised, in the dtype it trained in
    (a run on CUDA: bf16, whatever the checkpoint stores), then every weight widened to fp32 exactly and the 4-bit
    ones dequantised to fp32, not to that dtype. What merge folds and the GGUF export writes, and the reference both
    are checked against. `cfg`: as load_run's."""
    cfg, model, tokenizer, dev = load_run(run_dir, "cpu", trained_dtype(run_dir), method, base_path, cfg)
    torch.nn.Module.float(model)  # transformers' own .float() refuses a quantised model: its 4-bit weights are uint8
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.compute_dtype = torch.float32
            module.weight.quant_state.dtype = torch.float32  # bitsandbytes dequantises to it: code x absmax, exact
    cfg.quant.compute_dtype = "fp32"
    return cfg, model, tokenizer, dev
