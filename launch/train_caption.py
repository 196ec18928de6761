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

from hwtools.caption import evaluate as cap_eval
from hwtools.caption import run as cap_run
from hwtools.caption.data import collate_captions
from hwtools.caption.models import ImageCaptioningModel, build_caption_model
from hwtools.caption.vocab import VOCAB_FILE
from hwtools.config import LoopConfig, parse_config
from hwtools.data_report import DataReport
from hwtools.errors import UserError, cli_main
from hwtools.plots import loss_curves
from hwtools.train.loop import evaluate, make_accelerator, train
from hwtools.train.meters import count_parameters
from hwtools.train.phases import PhaseTimer, counting, progress
from hwtools.train.tracking import Tracker, prepare_run_dir, read_metrics, write_json, write_summary

logger = logging.getLogger("train_caption")
PER_ARCH = f"default per arch ({cap_run.describe_arch_defaults()})"


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
        cap_run.check_arch(self.arch)
        cap_run.check_split(self.split)
        if self.num_workers < -1:
            raise UserError(f"--num-workers {self.num_workers}: give -1 (auto) or a count >= 0")
        for name, value in cap_run.ARCH_DEFAULTS[self.arch].items():
            if getattr(self, name) is None:
                setattr(self, name, value)


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
        splits = cap_run.load_splits(cfg.data, cfg.cache_dir, cfg.seed, report, cfg.max_train_images,
                                     cfg.max_eval_images, split=cfg.split)
    vocab = cap_run.load_or_build_vocab(splits["train"], cfg.min_freq,
                                        existing=run_dir / VOCAB_FILE if cfg.resume else None)
    encoder, data_config = cap_run.build_image_encoder(cfg.arch, cfg.encoder, cfg.pretrained, cfg.encoder_weights,
                                                       cfg.finetune_blocks, log=accelerator.print)
    knobs = cap_run.decoder_knobs(cfg.arch, cfg)
    model = ImageCaptioningModel(encoder, build_caption_model(cfg.arch, len(vocab), encoder.out_dim, **knobs))
    with accelerator.main_process_first():  # one process fills the feature cache, the others read it
        inputs = cap_run.prepare_image_inputs(encoder, data_config, splits, cfg.feature_cache, cfg.cache_dir,
                                              accelerator.device, report, cfg.eval_batch_size, log=accelerator.print)
    data = {s: cap_run.make_dataset(items, vocab, cfg.max_len, inputs, train=s == "train")
            for s, items in splits.items()}
    workers = cap_run.loader_workers(cfg.num_workers, accelerator.device, inputs, accelerator.num_processes)
    loaders = {s: cap_run.make_loader(ds, cfg.batch_size if s == "train" else cfg.eval_batch_size,
                                      shuffle=s == "train", num_workers=workers,
                                      pin_memory=accelerator.device.type == "cuda") for s, ds in data.items()}
    report.warn(logger)
    params = count_parameters(model)
    accelerator.print(f"{cfg.arch}: vocabulary {len(vocab)}, images {inputs.cache_note}; train "
                      f"{len(data['train'])} captions / validation {len(data['validation'])} / test "
                      f"{len(data['test'])} images; parameters {params['trainable']:,} trainable of "
                      f"{params['total']:,}")

    spec = {"arch": cfg.arch, "encoder": cfg.encoder, "pretrained": cfg.pretrained,
            "encoder_weights": cfg.encoder_weights, "finetune_blocks": cfg.finetune_blocks, "knobs": knobs,
            "max_len": cfg.max_len, "beam_size": cfg.beam_size, "data": cfg.data, "split": cfg.split,
            "seed": cfg.seed,
            "max_eval_images": cfg.max_eval_images, "cache_dir": cfg.cache_dir}
    config_dict = {"task": "caption", **dataclasses.asdict(cfg), "vocab_size": len(vocab),
                   "encoder_timm_name": encoder.name, "encoder_weights_id": encoder.weights_id,
                   "image_inputs": inputs.cache_note}
    if accelerator.is_main_process:
        write_json(run_dir / "config.json", config_dict)
        vocab.save(run_dir / VOCAB_FILE)
    phases.begin("train")
    tracker = Tracker(accelerator, run_dir, cfg, config_dict)
    sample = collate_captions([data["validation"][0]])
    result = train(accelerator, model, loaders["train"], cap_run.weighted_caption_loss, cfg, run_dir, tracker,
                   eval_loader=loaders["validation"], count_fn=cap_run.count_images, throughput_unit="images/s",
                   on_epoch_end=cap_eval.epoch_caption_logger(accelerator, tracker, sample, vocab, cfg.max_len))
    model = result.model

    test = {}
    phases.begin("final_eval")
    if result.stopped_reason is None:
        test_loader = accelerator.prepare(loaders["test"])
        bar = progress(len(test_loader), "test loss", "batches", enabled=accelerator.is_local_main_process)
        test["loss"] = evaluate(accelerator, model, test_loader, counting(cap_run.weighted_caption_loss, bar))
        bar.close()
    if accelerator.is_main_process:
        title = f"{cfg.arch} on {cfg.data} ({cfg.encoder} encoder)"
        if result.stopped_reason is None:
            scores, figures = cap_eval.evaluate_and_report(model, loaders["test"], vocab, cfg.max_len,
                                                           cfg.beam_size, run_dir, title, data_config["input_size"])
            test.update(scores)
            phases.begin("save")
            tracker.log_images("test_figures", figures, step=result.steps)
            cap_run.save_final(run_dir / "final", model, vocab, spec)
        phases.begin("save")
        events = read_metrics(run_dir)
        loss_curves({split: ([e["step"] for e in events if e.get("split") == split and "loss" in e],
                             [e["loss"] for e in events if e.get("split") == split and "loss" in e])
                     for split in ("train", "eval")}, run_dir / "loss.png", title=title)
        tracker.log_images("plots", [run_dir / "loss.png"], step=result.steps)
        summary = write_summary(
            run_dir, task="caption", method=None, arch=cfg.arch, model=cfg.encoder, data=cfg.data, params=params,
            resources={**result.resources, "phases": phases.as_dict()}, train={"steps": result.steps, "final_loss": result.final_loss,
                                               "stopped_reason": result.stopped_reason},
            eval={"loss": result.eval_loss}, test=test, data_report=report.as_dict(),
            encoder={"timm_name": encoder.name, "weights": encoder.weights_id, "image_inputs": inputs.cache_note},
        )
        tracker.log({"step": result.steps, "split": "test",
                     **{k: v for k, v in test.items() if isinstance(v, (int, float))}})
        tracker.summarize(summary)
        accelerator.print(f"done: {run_dir} (test {_brief(summary['test'])})")
        accelerator.print(phases.line())
    accelerator.wait_for_everyone()
    tracker.finish()


def _brief(test: dict) -> str:
    keys = ("bleu4", "cider", "beam_bleu4", "beam_cider")
    return ", ".join(f"{k} {test[k]:.4f}" for k in keys if isinstance(test.get(k), float)) or "not evaluated"


if __name__ == "__main__":
    main()
