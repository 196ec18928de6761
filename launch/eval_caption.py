"""Re-evaluate a trained captioner on its test split, or caption any image files.

    python launch/eval_caption.py --run results/runs/caption-attention-20250101-120000
    python launch/eval_caption.py --run RUN_DIR --image photo1.jpg photo2.png --beam-size 5

Test split: the same metrics as training's summary.json `test` (greedy, and `beam_` with --beam-size > 1) into
`<output-dir>/eval.json`, with samples.png, errors.md and, for the attention arch, attention_<image>.png.
Images: prints one caption per file and, for the attention arch, writes attention_<image>.png per file.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from hwtools.caption import evaluate as cap_eval
from hwtools.caption import pipeline as cap
from hwtools.caption.data import collate_captions, image_problem
from hwtools.caption.final import SPEC_FILE, load_final, pick_device
from hwtools.config import parse_config
from hwtools.data_report import DataReport
from hwtools.errors import UserError, cli_main
from hwtools.train.tracking import write_json


@dataclass
class EvalCaptionArgs:
    run: str = field(metadata={"help": "A train_caption.py run directory (or its final/ folder)."})
    image: list[str] = field(default_factory=list, metadata={
        "help": "Image files to caption instead of the test split."})
    beam_size: Optional[int] = field(default=None, metadata={"help": "Beam width (default: the run's; 1: greedy)."})
    max_len: Optional[int] = field(default=None, metadata={"help": "Longest caption in tokens (default: the run's)."})
    output_dir: Optional[str] = field(default=None, metadata={"help": "Where figures go (default <run>/eval)."})
    cache_dir: Optional[str] = field(default=None, metadata={"help": "Data/feature cache (default: the run's)."})
    split: Optional[str] = field(default=None, metadata={
        "help": "Test split: random (80/10/10 by image) or official (Flickr_8k.testImages.txt); default: the run's."})
    batch_size: int = field(default=64, metadata={"help": "Images per batch."})


def caption_files(model, vocab, data_config, paths: list[str], max_len: int, beam_size: int, out_dir: Path):
    """Caption image files -> [(path, caption)]; attention maps for the attention arch go to out_dir."""
    from hwtools.caption.transforms import build_transforms

    transform = build_transforms(data_config, train=False)
    results = []
    for path in paths:
        problem = image_problem(Path(path))
        if problem:
            raise UserError(f"{path}: {problem}")
        item = {"image_id": path, "image": cap_eval.load_image_tensor(path, transform)}
        (text, alphas), = cap_eval.caption_batch(model, collate_captions([item]), vocab, max_len, beam_size)
        if alphas is not None:
            cap_eval.write_attention(out_dir, path, text, alphas, data_config["input_size"])
        results.append((path, text))
    return results


@cli_main
def main(argv=None):
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parse_config(EvalCaptionArgs, argv)
    run_dir = Path(args.run)
    if (run_dir / SPEC_FILE).is_file():  # given the final/ folder itself
        run_dir = run_dir.parent
    if not run_dir.is_dir():
        raise UserError(f"--run {run_dir}: no such run directory")
    final = run_dir / "final"
    model, vocab, spec, data_config = load_final(final)
    device = pick_device()
    model.to(device)
    beam = spec.get("beam_size", 1) if args.beam_size is None else args.beam_size
    if beam < 1:
        raise UserError(f"--beam-size {beam}: must be >= 1")
    max_len = args.max_len or spec["max_len"]
    out_dir = Path(args.output_dir) if args.output_dir else run_dir / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)

    if args.image:
        for path, text in caption_files(model, vocab, data_config, args.image, max_len, beam, out_dir):
            print(f"{path}\t{text}")
        if spec["arch"] == "attention":
            print(f"attention maps in {out_dir}")
        return

    report = DataReport()
    split = args.split or spec.get("split", "random")  # runs saved before --split existed used random
    cap.check_split(split)
    splits = cap.load_splits(spec["data"], args.cache_dir or spec["cache_dir"], spec["seed"], report,
                             max_eval_images=spec.get("max_eval_images", 0), split=split)
    test_only = {"test": splits["test"]}
    # a fine-tuned encoder's features differ from the cached ones of its starting weights: encode them live
    inputs = cap.prepare_image_inputs(model.encoder, data_config, test_only, spec["finetune_blocks"] == 0,
                                      args.cache_dir or spec["cache_dir"], device, report, args.batch_size, log=None)
    loader = cap.make_loader(cap.make_dataset(splits["test"], vocab, max_len, inputs, train=False),
                             args.batch_size, shuffle=False)
    title = f"{spec['arch']} on {spec['data']} ({spec['encoder']} encoder), re-evaluated"
    test, figures = cap_eval.evaluate_and_report(model, loader, vocab, max_len, beam, out_dir, title,
                                                 data_config["input_size"])
    write_json(out_dir / "eval.json", {"run": str(run_dir), "split": split, "test_images": len(splits["test"]),
                                       "beam_size": beam, "max_len": max_len, "test": test,
                                       "data_report": report.as_dict()})
    print(json.dumps({k: v for k, v in test.items() if not isinstance(v, dict)}))
    print(f"wrote {out_dir / 'eval.json'}, errors.md and {', '.join(p.name for p in figures)}")


if __name__ == "__main__":
    main()
