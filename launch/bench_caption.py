"""Benchmark the captioning pipeline: training with live encoding vs cached features, greedy vs beam decoding, and
batched vs one-image-at-a-time greedy generation, for each arch on the embedded data with the embedded (frozen)
encoder.

    python launch/bench_caption.py                       # all archs, 20 batches of 32, 5 repeats -> results/bench/
    python launch/bench_caption.py --archs attention --batches 10 --repeats 3 --device cuda
    python launch/bench_caption.py --quick --output-dir /tmp/bench   # tiny sizes: a smoke test, not a measurement

Both training variants run the same batches (a fixed seeded sample of the train split) through the same decoder and
optimiser; they differ only in how image features arrive: live = load JPEG + transform + encoder forward every step,
cached = read the feature cache that train_caption.py builds (same cache files, same key). Variants are interleaved
and the median of --repeats is reported, with a per-phase breakdown (data loading, encoder, decoder step) that says
where the time goes. Decoding runs on cached test-image features, so it measures the decoder alone.
"""
from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import torch
from accelerate.utils import send_to_device
from torch.utils.data import DataLoader, Subset

from hwtools import bench
from hwtools.caption import synthetic
from hwtools.caption.data import CaptionDataset, collate_captions, load_captions, split_by_image
from hwtools.caption.decode import beam_search, greedy_decode
from hwtools.caption.encoders import build_encoder
from hwtools.caption.features import encode_images
from hwtools.caption.models import ARCHS, ImageCaptioningModel, build_caption_model, caption_loss, encoder_output_for
from hwtools.caption.pipeline import cached_features
from hwtools.caption.transforms import build_transforms
from hwtools.caption.vocab import Vocab
from hwtools.config import default_cache_dir, parse_config
from hwtools.data_report import DataReport
from hwtools.device import bf16_supported, enable_tf32
from hwtools.errors import UserError, cli_main

CACHE_TARGET = 5.0  # cached features should make a frozen-encoder epoch at least this many times faster
PHASES = ("load", "encode", "decoder")
# --quick: sizes for the smoke test; a run in seconds that still goes through every code path
QUICK_SIZES = {"batches": 1, "batch_size": 2, "repeats": 2, "warmup_batches": 1, "decode_images": 2}
QUICK_IMAGES = 40  # images of the small embedded set --quick generates
QUICK_KNOBS = {"cnn-rnn": {"embed_dim": 16, "hidden_dim": 32},
               "attention": {"embed_dim": 16, "hidden_dim": 32, "attention_dim": 16},
               "transformer": {"d_model": 32, "nhead": 2, "num_layers": 1, "dim_feedforward": 64}}


@dataclass
class BenchCaptionArgs:
    archs: list[str] = field(default_factory=lambda: list(ARCHS), metadata={
        "help": "Architectures to measure (space separated): cnn-rnn attention transformer."})
    batches: int = field(default=20, metadata={"help": "Training batches per timed pass (fewer if the split is "
                                                       "smaller: then one pass is an epoch)."})
    batch_size: int = field(default=32, metadata={"help": "Captions (image, caption pairs) per training batch."})
    repeats: int = field(default=3, metadata={"help": "Timed repeats of every variant; the median is reported."})
    warmup_batches: int = field(default=2, metadata={
        "help": "Untimed training batches of every variant before the repeats (decoding warms up with one pass)."})
    threads: int = field(default=0, metadata={
        "help": "torch CPU threads (0: torch's default, one per core). Use 1 on a CPU shared with other processes: "
                "the CPU-time figures then measure the work alone."})
    decode_images: int = field(default=64, metadata={"help": "Test images captioned per decoding pass."})
    beam_size: int = field(default=3, metadata={"help": "Beam width compared with greedy decoding."})
    max_len: int = field(default=20, metadata={"help": "Caption length in tokens (as train_caption.py)."})
    min_freq: int = field(default=5, metadata={"help": "Vocabulary cut (as train_caption.py)."})
    data: str = field(default="embedded", metadata={"help": "embedded or a Flickr8k folder (see train_caption.py)."})
    encoder: str = field(default="embedded", metadata={
        "help": "embedded, or a timm model name with random weights (its features are then kept in memory only)."})
    cache_dir: str = field(default_factory=default_cache_dir, metadata={
        "help": "Cache of the embedded data set and of the features (shared with train_caption.py)."})
    output_dir: str = field(default="results/bench", metadata={"help": "Where caption.md and caption.json go."})
    name: Optional[str] = field(default=None, metadata={
        "help": "Base name of the result files (default: caption on a CPU, caption_<device type> elsewhere, e.g. "
                "caption_cuda, so that a GPU run never overwrites the CPU results)."})
    device: str = field(default="auto", metadata={"help": "auto (cuda if available, else cpu), cpu, cuda, cuda:1."})
    precision: str = field(default="auto", metadata={"help": "auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | "
                                                             "bf16."})
    num_workers: int = field(default=0, metadata={"help": "DataLoader workers (train_caption.py: 0 with cached features, up to 4 on a GPU otherwise)."})
    seed: int = field(default=42, metadata={"help": "Seed of the split, the batch sample and the weights."})
    notes: list[str] = field(default_factory=list, metadata={"help": "Free-text notes written into the results."})
    quick: bool = field(default=False, metadata={
        "help": f"Smoke test: {QUICK_SIZES}, tiny decoders, a {QUICK_IMAGES}-image embedded set."})


# --------------------------------------------------------------------------------------------------------- setup


def check_args(args: BenchCaptionArgs) -> BenchCaptionArgs:
    unknown = [a for a in args.archs if a not in ARCHS]
    if unknown or not args.archs:
        raise UserError(f"--archs {' '.join(args.archs)}: choose from {', '.join(ARCHS)}")
    for name in ("batches", "batch_size", "repeats", "decode_images", "beam_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1")
    if args.warmup_batches < 0 or args.num_workers < 0 or args.threads < 0:
        raise UserError("--warmup-batches, --num-workers and --threads must be >= 0")
    if args.precision not in ("auto", "fp32", "bf16"):
        raise UserError(f"--precision {args.precision}: choose auto, fp32 or bf16")
    return replace(args, **QUICK_SIZES) if args.quick else args


def use_bf16(precision: str, device: torch.device) -> bool:
    return precision == "bf16" or (precision == "auto" and bf16_supported(device))


def result_name(name: Optional[str], device: torch.device) -> str:
    """--name, else caption (CPU) or caption_<device type> (the committed CPU results keep their name)."""
    return name or ("caption" if device.type == "cpu" else f"caption_{device.type}")


def load_data(args: BenchCaptionArgs) -> tuple[dict, Vocab, DataReport]:
    """The train/validation/test splits (as train_caption.py splits them) and the train vocabulary."""
    report = DataReport()
    data = args.data
    if args.quick and data == "embedded":
        data = str(synthetic.ensure_embedded(Path(args.cache_dir).expanduser(), n_images=QUICK_IMAGES))
    splits = split_by_image(load_captions(data, report, args.cache_dir), seed=args.seed)
    vocab = Vocab.build([c for caps in splits["train"].values() for c in caps], args.min_freq)
    return splits, vocab, report


# ------------------------------------------------------------------------------------------------------ training


def train_pass(decoder_model: ImageCaptioningModel, optimizer, loader: DataLoader, device: torch.device,
               encoder: Optional[torch.nn.Module], autocast: Callable) -> dict:
    """One pass of training steps over `loader`; images come through `encoder` when given (live), else the batches
    carry cached features. -> wall and CPU seconds spent per phase, and images seen."""
    phases = {f"{p}{unit}": 0.0 for p in PHASES for unit in ("", "_cpu")}
    images = 0
    bench.reset_peak_memory(device)
    batches = iter(loader)

    def clock():
        bench.synchronize(device)
        return time.perf_counter(), time.process_time()

    while True:
        marks = [clock()]
        batch = next(batches, None)
        if batch is None:
            break
        batch = send_to_device(batch, device, non_blocking=True)
        marks.append(clock())
        if encoder is not None:
            with torch.no_grad(), autocast():
                batch["features"] = encoder(batch.pop("image"))
        marks.append(clock())
        with autocast():
            loss = caption_loss(decoder_model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(decoder_model.parameters(), 1.0)  # as the shared loop does
        optimizer.step()
        marks.append(clock())
        for phase, (start, end) in zip(PHASES, zip(marks, marks[1:])):
            phases[phase] += end[0] - start[0]
            phases[f"{phase}_cpu"] += end[1] - start[1]
        images += len(batch["image_id"])
    return {"images": images, **phases, "peak_cuda_mb": bench.peak_cuda_memory_mb(device)}


def bench_training(model, encoder, live_ds, cached_ds, indices, args, device, autocast) -> dict:
    """Live encoding vs cached features on the same batches, interleaved; medians of --repeats."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def loader(ds, subset):
        return DataLoader(Subset(ds, subset), batch_size=args.batch_size, shuffle=False,
                          collate_fn=collate_captions, num_workers=args.num_workers,
                          pin_memory=device.type == "cuda")

    def passes(subset):
        return {"live": lambda: train_pass(model, optimizer, loader(live_ds, subset), device, encoder, autocast),
                "cached": lambda: train_pass(model, optimizer, loader(cached_ds, subset), device, None, autocast)}

    warmup = indices[:args.warmup_batches * args.batch_size]
    runs_by_variant = bench.interleaved_runs(passes(indices), args.repeats, warmup=1 if warmup else 0,
                                             device=device, warmup_fns=passes(warmup))
    out = {}
    for name, runs in runs_by_variant.items():
        images = runs[0].value["images"]
        seconds = bench.summarize([r.seconds for r in runs])
        n_batches = -(-images // args.batch_size)
        out[name] = {"images_per_s": bench.rate(images, seconds["median"]), "seconds": seconds,
                     "cpu_seconds": bench.summarize([r.cpu_seconds for r in runs]),
                     "ms_per_batch": {p: 1000 * bench.summarize([r.value[p] for r in runs])["median"] / n_batches
                                      for p in PHASES},
                     "cpu_ms_per_batch": {p: 1000 * bench.summarize([r.value[f"{p}_cpu"] for r in runs])["median"]
                                          / n_batches for p in PHASES},
                     "peak_cuda_mb": runs[0].value["peak_cuda_mb"]}
    out["images_per_pass"] = images
    out["speedup"] = out["live"]["seconds"]["median"] / out["cached"]["seconds"]["median"]
    out["speedup_cpu_time"] = out["live"]["cpu_seconds"]["median"] / out["cached"]["cpu_seconds"]["median"]
    out["target"] = CACHE_TARGET
    out["meets_target"] = out["speedup"] >= CACHE_TARGET
    return out


# ------------------------------------------------------------------------------------------------------ decoding


def bench_decoding(model, features: torch.Tensor, args, device, autocast) -> dict:
    """Greedy (batched), beam (batched) and greedy one image at a time on the same features, interleaved."""
    features = features.to(device)
    n = features.shape[0]

    def greedy():
        with autocast():
            return greedy_decode(model, features, args.max_len)[0]

    def beam():
        with autocast():
            return beam_search(model, features, args.beam_size, args.max_len)[0]

    def single():
        with autocast():
            return [greedy_decode(model, features[i:i + 1], args.max_len)[0][0] for i in range(n)]

    fns = {"greedy_batched": greedy, f"beam{args.beam_size}_batched": beam, "greedy_single": single}
    runs = bench.interleaved_runs(fns, args.repeats, warmup=1, device=device)
    out = {"images": n, "max_len": args.max_len, "beam_size": args.beam_size}
    for name, rs in runs.items():
        seconds = bench.summarize([r.seconds for r in rs])
        ids = rs[0].value
        out[name] = {"images_per_s": bench.rate(n, seconds["median"]), "seconds": seconds,
                     "cpu_seconds": bench.summarize([r.cpu_seconds for r in rs]),
                     "mean_words": sum(map(len, ids)) / n,
                     "ended_before_max_len": sum(len(c) < args.max_len for c in ids) / n}
    beam_name = f"beam{args.beam_size}_batched"
    out["greedy_over_beam"] = out["greedy_batched"]["images_per_s"] / out[beam_name]["images_per_s"]
    out["batched_over_single"] = out["greedy_batched"]["images_per_s"] / out["greedy_single"]["images_per_s"]
    cpu = {name: out[name]["cpu_seconds"]["median"] for name in fns}
    out["greedy_over_beam_cpu_time"] = cpu[beam_name] / cpu["greedy_batched"]
    out["batched_over_single_cpu_time"] = cpu["greedy_single"] / cpu["greedy_batched"]
    batched, single_ids = runs["greedy_batched"][0].value, runs["greedy_single"][0].value
    # batched decoding must not change the captions: padding-free state, so every row decodes as if alone
    out["single_matches_batched"] = sum(a == b for a, b in zip(batched, single_ids)) / n
    return out


# ---------------------------------------------------------------------------------------------------------- arch


def bench_arch(arch: str, args: BenchCaptionArgs, splits: dict, vocab: Vocab, device: torch.device,
               encoders: dict, autocast: Callable, log: Callable[[str], None]) -> dict:
    kind = encoder_output_for(arch)
    if kind not in encoders:
        built = build_encoder(args.encoder, kind, log=log)
        encoders[kind] = (built.module.to(device), build_transforms(built.data_config, train=False))
    encoder, eval_tf = encoders[kind]

    live_ds = CaptionDataset(splits["train"], vocab, args.max_len, transform=eval_tf, train=True)
    n = min(args.batches * args.batch_size, len(live_ds))
    indices = torch.randperm(len(live_ds), generator=torch.Generator().manual_seed(args.seed))[:n].tolist()
    test_images = list(splits["test"])[:args.decode_images]
    wanted = list(dict.fromkeys([live_ds.samples[i][0] for i in indices] + test_images))

    start = time.perf_counter()
    if encoder.weights_id is None:  # random weights: features of this process's encoder only, never on disk
        features = encode_images(encoder, wanted, eval_tf, args.batch_size, device=device)
    else:  # the cache files train_caption.py reads and fills
        features = cached_features(encoder, wanted, eval_tf, args.cache_dir, args.batch_size, device, log=log)
    cache_s = time.perf_counter() - start
    cached_ds = CaptionDataset(splits["train"], vocab, args.max_len, train=True, features=features)

    torch.manual_seed(args.seed)
    # the width the features really have (encoder.out_dim is timm's num_features, which a conv head after the
    # pooling, as in MobileNetV3, changes)
    decoder = build_caption_model(arch, len(vocab), features[wanted[0]].shape[-1],
                                  **(QUICK_KNOBS[arch] if args.quick else {})).to(device)
    model = ImageCaptioningModel(None, decoder)
    model.train()
    log(f"{arch}: training {n} captions in batches of {args.batch_size}, live vs cached, {args.repeats} repeats")
    train = bench_training(model, encoder, live_ds, cached_ds, indices, args, device, autocast)
    log(f"{arch}: live {train['live']['images_per_s']:.1f} img/s, cached {train['cached']['images_per_s']:.1f} "
        f"img/s, speedup {train['speedup']:.2f}x")
    # decoding after those training steps: a decoder that has learned to emit <end> stops like a trained one does
    decode = bench_decoding(model, torch.stack([features[p] for p in test_images]).float(), args, device, autocast)
    log(f"{arch}: greedy/beam {decode['greedy_over_beam']:.2f}x, batched/single {decode['batched_over_single']:.2f}x")
    return {"decoder_params": sum(p.numel() for p in decoder.parameters()), "feature_kind": kind,
            "feature_shape": list(features[wanted[0]].shape),
            "cache": {"images": len(wanted), "seconds": cache_s}, "train": train, "decode": decode}


# ------------------------------------------------------------------------------------------------------- report


def _ms(value: float) -> str:
    return f"{value:.0f}" if value >= 10 else f"{value:.1f}" if value >= 0.05 else "0"


def markdown_body(results: dict, args: BenchCaptionArgs) -> str:
    """The result tables and what they mean, for caption.md."""
    archs = results["archs"]
    beam = f"beam{args.beam_size}_batched"
    train_rows, phase_rows, decode_rows = [], [], []
    cuda = next(iter(archs.values()))["train"]["live"]["peak_cuda_mb"] is not None
    for arch, r in archs.items():
        t, d = r["train"], r["decode"]
        train_rows.append([arch, t["live"]["images_per_s"], t["cached"]["images_per_s"], f"{t['speedup']:.2f}x",
                           f"{t['speedup_cpu_time']:.2f}x", "yes" if t["meets_target"] else "NO"]
                          + ([f"{t['live']['peak_cuda_mb']:.0f} / {t['cached']['peak_cuda_mb']:.0f}"] if cuda else []))
        for variant in ("live", "cached"):
            wall, cpu = t[variant]["ms_per_batch"], t[variant]["cpu_ms_per_batch"]
            phase_rows.append([arch, variant] + [f"{_ms(wall[p])} / {_ms(cpu[p])}" for p in PHASES]
                              + [f"{t[variant]['seconds']['min']:.1f}-{t[variant]['seconds']['max']:.1f}"])
        decode_rows.append([arch, d["greedy_batched"]["images_per_s"], d[beam]["images_per_s"],
                            f"{d['greedy_over_beam']:.2f}x / {d['greedy_over_beam_cpu_time']:.2f}x",
                            d["greedy_single"]["images_per_s"],
                            f"{d['batched_over_single']:.2f}x / {d['batched_over_single_cpu_time']:.2f}x",
                            d["greedy_batched"]["mean_words"], f"{100 * d['single_matches_batched']:.0f}%"])
    first = next(iter(archs.values()))
    images = first["train"]["images_per_pass"]
    missed = [a for a, r in archs.items() if not r["train"]["meets_target"]]
    verdict = (f"Every arch meets the {CACHE_TARGET:g}x target." if not missed else
               f"Below the {CACHE_TARGET:g}x target: {', '.join(missed)}. Caching removes the load and encoder "
               f"columns and nothing else, so the speedup is (load + encoder + decoder) / (lookup + decoder): an arch "
               f"whose decoder step costs more than a quarter of load + encoder cannot reach {CACHE_TARGET:g}x "
               f"(see the breakdown).")
    lines = [
        "## Training: live encoding vs cached features (frozen encoder)", "",
        f"{images} captions per pass ({-(-images // args.batch_size)} batches of {args.batch_size}, the same "
        f"seeded sample of the train split for both variants), median of {args.repeats} interleaved repeats after "
        f"{args.warmup_batches} warm-up batch(es) each. Images/s counts (image, caption) pairs, as the training "
        f"summary does. Live = JPEG decode + transform + encoder forward every step; cached = the feature cache "
        f"train_caption.py builds. Speedup = live time / cached time, from wall clock and from this process's CPU "
        f"time (with one torch thread the CPU time is the work alone, whatever else runs on the machine). "
        f"Target: cached >= {CACHE_TARGET:g}x live.", "",
        bench.markdown_table(["arch", "live images/s", "cached images/s", "speedup (wall)", "speedup (CPU time)",
                              f">= {CACHE_TARGET:g}x (wall)"] + (["peak CUDA MiB live / cached"] if cuda else []),
                             train_rows), "",
        verdict, "",
        "Where a batch's time goes, median ms per batch, wall / CPU (load = JPEG decode + transform for live, feature "
        "lookup + collate for cached; decoder = forward + backward + clip + AdamW step):", "",
        bench.markdown_table(["arch", "variant", "load ms", "encoder ms", "decoder ms", "pass s (min-max)"],
                             phase_rows), "",
        "## Decoding (cached test-image features, decoder only)", "",
        f"{first['decode']['images']} test images in one batch, at most {args.max_len} words; the decoder is the "
        f"one just trained by the passes above (an untrained decoder never emits <end> and would always run to the "
        f"limit). Ratios are wall / CPU time. 'same captions' = batched greedy gives the same words as decoding "
        f"each image alone.", "",
        bench.markdown_table(["arch", "greedy images/s", f"beam-{args.beam_size} images/s", "greedy/beam",
                              "greedy 1-at-a-time images/s", "batched/single", "mean words", "same captions"],
                             decode_rows), "",
        f"Beam-{args.beam_size} does {args.beam_size}x the greedy work per step plus reordering the decoding state "
        f"(for attention the per-image regions too), so greedy/beam above {args.beam_size} is that reordering. The "
        f"transformer re-runs its decoder on the whole prefix at every step (no KV cache), so a step grows with "
        f"the caption and batching amortises less of it than for the recurrent decoders.", "",
    ]
    return "\n".join(lines)


def auto_notes(machine: dict, args: BenchCaptionArgs) -> list[str]:
    notes = list(args.notes) + bench.busy_cpu_notes(machine, "images/s")
    if args.quick:
        notes.append("--quick: smoke-test sizes and tiny decoders; these numbers measure nothing.")
    return notes


@cli_main
def main(argv=None) -> dict:
    started = time.time()
    args = check_args(parse_config(BenchCaptionArgs, argv))
    threads = bench.set_threads(args.threads)
    device = bench.resolve_device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: CUDA is not available on this machine")
    machine = bench.machine_info(device)
    bf16 = use_bf16(args.precision, device)
    enable_tf32(device)  # as the recipes' accelerator does

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()

    splits, vocab, report = load_data(args)
    print(f"data {args.data}: {', '.join(f'{s} {len(v)} images' for s, v in splits.items())}; vocab {len(vocab)}; "
          f"device {device}, {'bf16 autocast' if bf16 else 'fp32'}, {threads} torch thread(s)", flush=True)
    encoders: dict = {}
    archs = {arch: bench_arch(arch, args, splits, vocab, device, encoders, autocast,
                              log=lambda m: print(m, flush=True)) for arch in args.archs}
    results = {"archs": archs, "vocab_size": len(vocab), "precision": "bf16" if bf16 else "fp32",
               "data_report": report.as_dict(), "cache_target": CACHE_TARGET}
    md, js = bench.write_results(args.output_dir, result_name(args.name, device), "Captioning benchmark: feature cache, decoding",
                                 results, markdown_body(results, args), settings=asdict(args),
                                 notes=auto_notes(machine, args), machine=machine, started_at=started)
    print(f"wrote {md} and {js}")
    return results


if __name__ == "__main__":
    main()
