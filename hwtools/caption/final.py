"""A trained captioner's final/ folder: written at the end of a run, rebuilt exactly as it was trained.

final/ holds the decoder weights (the encoder's too when it was fine-tuned), `vocab.json` and `caption_model.json`
(arch, encoder, knobs, data and split).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

import torch

from hwtools.caption.encoders import build_encoder
from hwtools.caption.models import ImageCaptioningModel, build_caption_model, encoder_output_for
from hwtools.caption.vocab import VOCAB_FILE, Vocab
from hwtools.errors import UserError

SPEC_FILE = "caption_model.json"
DECODER_FILE = "decoder.safetensors"
ENCODER_FILE = "encoder.safetensors"


def save_final(out_dir: Path, model: ImageCaptioningModel, vocab: Vocab, spec: dict) -> Path:
    """final/: decoder weights, the encoder's too when it was fine-tuned, vocab.json and caption_model.json."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.decoder.state_dict().items()},
              str(out_dir / DECODER_FILE))
    if spec.get("finetune_blocks", 0) > 0:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.encoder.state_dict().items()},
                  str(out_dir / ENCODER_FILE))
    vocab.save(out_dir / VOCAB_FILE)
    (out_dir / SPEC_FILE).write_text(json.dumps(spec, indent=2), encoding="utf-8")
    return out_dir


def load_final(final_dir: Path, log: Optional[Callable[[str], None]] = None):
    """Rebuild a saved captioner -> (ImageCaptioningModel in eval mode, vocab, spec, timm data config)."""
    from safetensors.torch import load_file

    final_dir = Path(final_dir)
    spec_path = final_dir / SPEC_FILE
    if not spec_path.is_file():
        raise UserError(f"{final_dir}: no {SPEC_FILE}; is this the final/ folder of a finished captioning run?")
    try:
        spec = json.loads(spec_path.read_text(encoding="utf-8"))
        arch, knobs = spec["arch"], spec["knobs"]
    except (ValueError, KeyError) as e:
        raise UserError(f"{spec_path}: not a caption model description ({e})") from None
    vocab = Vocab.load(final_dir / VOCAB_FILE)
    built = build_encoder(spec["encoder"], encoder_output_for(arch), pretrained=spec.get("pretrained", False),
                          weights_path=spec.get("encoder_weights"), finetune_blocks=0, log=log)
    encoder, data_config = built.module, built.data_config
    if (final_dir / ENCODER_FILE).is_file():
        encoder.load_state_dict(load_file(str(final_dir / ENCODER_FILE)))
    decoder = build_caption_model(arch, len(vocab), encoder.out_dim, **knobs)
    decoder.load_state_dict(load_file(str(final_dir / DECODER_FILE)))
    model = ImageCaptioningModel(encoder, decoder).eval()
    return model, vocab, spec, data_config


def pick_device() -> torch.device:
    """Where a saved captioner is re-evaluated: the GPU when there is one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
