"""Train an image captioner (Show and Tell, Show Attend and Tell, or CNN-Transformer) on Flickr8k-style data.

    accelerate launch launch/train_caption.py --arch attention
    accelerate launch launch/train_caption.py --arch transformer --data /data/Flickr8k --encoder resnet50 --pretrained

Recipe only: parse the config, build the pieces from hwtools.caption, run the shared loop, write the run contract.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Optional

from hwtools.caption import pipeline as cap
from hwtools.caption.data import collate_captions
from hwtools.caption.evaluate import epoch_caption_logger
from hwtools.caption.models import ImageCaptioningModel, build_caption_model
from hwtools.caption.vocab import VOCAB_FILE
from hwtools.config import LoopConfig, parse_config
from hwtools.data_report import DataReport
from hwtools.errors import UserError, cli_main
from hwtools.train.loop import make_accelerator, train
from hwtools.train.meters import count_parameters
from hwtools.train.phases import PhaseTimer
from hwtools.train.run_end import evaluate_test_loss
from hwtools.train.tracking import Tracker, prepare_run_dir, write_json

logger = logging.getLogger("train_caption")
PER_ARCH = f"default per arch ({cap.describe_arch_defaults()})"


@dataclass
class CaptionTrainConfig(LoopConfig):
    """All flags of train_caption.py: the loop's and these."""

    arch: str = field(default="attention", metadata={"help": "cnn-rnn | attention | transformer."})
    data: str = field(default="embedded", metadata={
        "help": "embedded (generated Flickr8k-layout set), a Flickr8k folder (original or Kaggle layout), a "
                "datasets folder or a hub id."})
    split: str = field(default="random", metadata={
        "help": "random: 80/10/10 by image with --seed; official: Flickr8k's own "
                "Flickr_8k.{train,dev,test}Images.txt (6000/1000/1000; the lists from Flickr8k_text.zip, beside "
                "the data)."})
    encoder: str = field(default="embedded", metadata={
        "help": "embedded (tf_efficientnet_lite0 with packaged ImageNet weights) or a timm model name."})
    pretrained: bool = field(default=False, metadata={"help": "Load the timm encoder's weights from the hub."})
    encoder_weights: Optional[str] = field(default=None, metadata={"help": "Local state dict for the timm encoder."})
    finetune_blocks: int = field(default=0, metadata={
        "help": "Train the encoder's last N blocks end to end, with augmentation (0: frozen, cached features)."})
    feature_cache: bool = field(default=True, metadata={
        "help": "Encode each image once when the encoder is frozen (--no-feature-cache: encode every batch)."})
    num_workers: int = field(default=-1, metadata={
        "help": "DataLoader workers; -1 (auto): up to 4 per process on a GPU when images are read live (no feature "
                "cache, or the encoder trains), else 0. Batches go to pinned memory on a GPU."})
    max_len: int = field(default=20, metadata={"help": "Caption length in tokens incl. <start>/<end> (pad/cut)."})
    min_freq: int = field(default=5, metadata={"help": "Words seen fewer times in the train split become <unk>."})
    beam_size: int = field(default=3, metadata={"help": "Beam width for the test evaluation (1: greedy only)."})
    embed_dim: int = field(default=256, metadata={"help": "Word embedding size (cnn-rnn, attention)."})
    hidden_dim: int = field(default=512, metadata={"help": "LSTM hidden size (cnn-rnn, attention)."})
    attention_dim: int = field(default=256, metadata={"help": "Additive attention size (attention)."})
    alpha_c: float = field(default=1.0, metadata={"help": "Weight of the doubly stochastic regulariser (attention)."})
    image_as_first_input: bool = field(default=False, metadata={
        "help": "cnn-rnn: feed the image as the first LSTM input (paper) instead of initialising (h, c) from it."})
    d_model: int = field(default=256, metadata={"help": "Transformer width (transformer)."})
    heads: int = field(default=4, metadata={"help": "Attention heads (transformer)."})
    ff_dim: int = field(default=1024, metadata={"help": "Feed-forward size (transformer)."})
    num_layers: Optional[int] = field(default=None, metadata={"help": f"LSTM / Transformer layers; {PER_ARCH}."})
    dropout: Optional[float] = field(default=None, metadata={"help": f"Dropout; {PER_ARCH}."})
    lr: Optional[float] = field(default=None, metadata={"help": f"Peak learning rate; {PER_ARCH}."})
    epochs: float = field(default=10.0, metadata={
        "help": "Passes over the training captions; the same for every arch so runs compare."})
    batch_size: int = field(default=32, metadata={"help": "Captions per micro-batch per process."})
    eval_batch_size: int = field(default=64, metadata={"help": "Images per batch when captioning the test split."})
    max_train_images: int = field(default=0, metadata={"help": "Use the first N train images only (0: all)."})
    max_eval_images: int = field(default=0, metadata={
        "help": "Use the first N validation and test images only (0: all; set only for quick runs)."})

    def __post_init__(self):
        cap.apply_arch_defaults(self)  # an unknown --arch fails here
        cap.check_split(self.split)
        if self.num_workers < -1:
            raise UserError(f"--num-workers {self.num_workers}: give -1 (auto) or a count >= 0")


@cli_main
def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = parse_config(CaptionTrainConfig, argv)
    accelerator = make_accelerator(cfg)
    run_dir = prepare_run_dir(cfg, "caption", cfg.arch, accelerator)

    phases = PhaseTimer()
    phases.begin("load")
    report = DataReport()
    with accelerator.main_process_first():  # the main process generates the embedded set; the others read it
        splits = cap.load_splits(cfg.data, cfg.cache_dir, cfg.seed, report, cfg.max_train_images,
                                 cfg.max_eval_images, split=cfg.split)
    vocab = cap.load_or_build_vocab(splits["train"], cfg.min_freq,
                                    existing=run_dir / VOCAB_FILE if cfg.resume else None)
    encoder, data_config = cap.build_image_encoder(cfg.arch, cfg.encoder, cfg.pretrained, cfg.encoder_weights,
                                                   cfg.finetune_blocks, log=accelerator.print)
    knobs = cap.decoder_knobs(cfg.arch, cfg)
    model = ImageCaptioningModel(encoder, build_caption_model(cfg.arch, len(vocab), encoder.out_dim, **knobs))
    with accelerator.main_process_first():  # one process fills the feature cache, the others read it
        inputs = cap.prepare_image_inputs(encoder, data_config, splits, cfg.feature_cache, cfg.cache_dir,
                                          accelerator.device, report, cfg.eval_batch_size, log=accelerator.print)
    data, loaders = cap.build_loaders(cfg, splits, vocab, inputs, accelerator.device, accelerator.num_processes)
    report.warn(logger)
    params = count_parameters(model)
    accelerator.print(f"{cfg.arch}: vocabulary {len(vocab)}, images {inputs.cache_note}; train "
                      f"{len(data['train'])} captions / validation {len(data['validation'])} / test "
                      f"{len(data['test'])} images; parameters {params['trainable']:,} trainable of "
                      f"{params['total']:,}")

    config_dict = {"task": "caption", **dataclasses.asdict(cfg), "vocab_size": len(vocab),
                   "encoder_timm_name": encoder.name, "encoder_weights_id": encoder.weights_id,
                   "image_inputs": inputs.cache_note}
    if accelerator.is_main_process:
        write_json(run_dir / "config.json", config_dict)
        vocab.save(run_dir / VOCAB_FILE)
    phases.begin("train")
    tracker = Tracker(accelerator, run_dir, cfg, config_dict)
    sample = collate_captions([data["validation"][0]])
    result = train(accelerator, model, loaders["train"], cap.weighted_caption_loss, cfg, run_dir, tracker,
                   eval_loader=loaders["validation"], count_fn=cap.count_images, throughput_unit="images/s",
                   on_epoch_end=epoch_caption_logger(accelerator, tracker, sample, vocab, cfg.max_len))
    model = result.model

    phases.begin("final_eval")
    test = {}
    if result.stopped_reason is None:
        test_loader = accelerator.prepare(loaders["test"])
        test["loss"] = evaluate_test_loss(accelerator, model, test_loader, cap.weighted_caption_loss, "test loss")
    if accelerator.is_main_process:
        summary = cap.write_outputs(run_dir, tracker, cfg, model, loaders["test"], vocab, data_config, knobs, result,
                                    phases, test=test, params=params, report=report, encoder=encoder, inputs=inputs)
        accelerator.print(f"done: {run_dir} (test {cap.brief(summary['test'])})")
        accelerator.print(phases.line())
    accelerator.wait_for_everyone()
    tracker.finish()


if __name__ == "__main__":
    main()
