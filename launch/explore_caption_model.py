"""The captioning encoders' output dimensions, computed from code (random weights: shapes do not depend on them).

    python launch/explore_caption_model.py --output-dir results/explore/caption

Writes encoders.json: for each timm encoder, the pooled (Show and Tell) and spatial (attention, Transformer) output
shapes for one image at its default input size, the feature map before flattening, timm's preprocessing, and the
parameters `--finetune-blocks N` unfreezes. results/REPORT.md reads the committed copy under results/explore/caption.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from hwtools.errors import cli_main


@dataclass
class ExploreCaptionModelArgs:
    encoders: str = field(default="tf_efficientnet_lite0,efficientnet_b0,resnet50", metadata={
        "help": "comma-separated timm names (tf_efficientnet_lite0 is the embedded encoder's architecture)"})
    finetune_blocks: int = field(default=2, metadata={"help": "count the parameters this many last blocks add"})
    output_dir: str = field(default="results/explore/caption", metadata={"help": "where encoders.json goes"})


@cli_main
def main(argv=None):
    from transformers import HfArgumentParser

    from hwtools.report_model import encoder_shapes

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    (args,) = HfArgumentParser(ExploreCaptionModelArgs).parse_args_into_dataclasses(args=argv)
    rows = encoder_shapes([n.strip() for n in args.encoders.split(",") if n.strip()], args.finetune_blocks)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "encoders.json").write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    for r in rows:
        print(f"{r['name']}: input {r['data_config']['input_size']} -> pooled {r['pooled_shape']}, spatial "
              f"{r['spatial_shape']} (feature map {r['feature_map_shape']}); --finetune-blocks {r['finetune_blocks']} "
              f"trains {r['trainable_with_finetune_blocks']:,} of {r['params']:,}")
    print(f"wrote {out / 'encoders.json'}")


if __name__ == "__main__":
    main()
