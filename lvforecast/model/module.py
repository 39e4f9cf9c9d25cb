"""LightningModule that fine-tunes a LoRA-wrapped causal LM on LLMTIME windows.

Loss: next-token cross-entropy over non-pad tokens; ``val/loss`` is the token-weighted mean over the validation
set. Checkpoints hold only trainable tensors (adapter, optional logit bias) plus optimizer and loop state.

``model.head=full`` scores the whole vocabulary with the lm_head; ``alphabet`` runs the decoder stack alone and
scores only the 13 LLMTIME characters with frozen rows of the output matrix (:class:`.AlphabetHead`;
labels become alphabet indices, the logit bias a 13-vector). Both log ``val/loss_alphabet``, the cross-entropy over the
alphabet's columns only (for ``alphabet`` it equals ``val/loss``), so runs of both compare.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from lvforecast.budget.shapes import HEADS, Head
from lvforecast.data.encoding import ALPHABET
from lvforecast.data.windows import IGNORE_INDEX
from lvforecast.errors import DivergedError, UserError
from lvforecast.model.heads import AlphabetHead, LogitBias, decoder_stack
from lvforecast.model.lora import count_parameters
from lvforecast.validate import check_choice

log = logging.getLogger(__name__)

_LAYER = re.compile(r"layers\.(\d+)\.(?:.*\.)?(\w+)\.lora_([AB])\.")
#: Decoder stacks whose forward takes a ready ``{layer type: mask}`` mapping as ``attention_mask`` (transformers 5).
MASK_MAPPING_STACKS = frozenset({"Qwen2Model"})


def unpadded_attention_mask(stack: Any, batch: int, length: int) -> dict[str, Any] | None:
    """The ``attention_mask`` for ``(batch, length)`` ids without padding run by ``stack`` (:func:`.decoder_stack`),
    made from the shape alone: ``{layer type: mask}`` (the mask None for ``sdpa``, whose ``is_causal`` kernels then
    run; 4D for ``eager``), or None for a stack not in :data:`MASK_MAPPING_STACKS` (it then builds the mask itself).

    Given a 2D mask, a transformers 5 model asks the device whether it has a zero; given none, whether the position
    ids restart: a host sync in every forward. This mapping, built with transformers' own functions, avoids both.
    """
    if type(stack).__name__ not in MASK_MAPPING_STACKS:
        return None
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    makers = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}
    config = stack.config
    kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
    if not kinds <= makers.keys():
        return None
    # The mask functions read only the shape, dtype and device of the embeddings: a (B, T, 0) stand-in holds no data.
    probe = stack.embed_tokens.weight.new_empty((batch, length, 0))
    return {kind: makers[kind](config=config, inputs_embeds=probe, attention_mask=None, cache=None) for kind in kinds}


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss_sum, n_tokens)``: summed next-token cross-entropy of (B, T, V) ``logits`` against (B, T) ``labels``
    (-100: no loss), position t predicting label t + 1."""
    shift_logits, shift_labels = logits[:, :-1].float(), labels[:, 1:]
    loss = F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, (shift_labels != IGNORE_INDEX).sum()


def alphabet_ids(char_ids: Mapping[str, int]) -> list[int]:
    """The alphabet's token ids in :data:`~lvforecast.data.encoding.ALPHABET` order, from ``char_ids`` as
    :func:`~lvforecast.data.encoding.check_tokenizer` returns them (it has every character)."""
    return [int(char_ids[ch]) for ch in ALPHABET]


def alphabet_labels(labels: torch.Tensor, lookup: torch.Tensor, check: bool = True) -> torch.Tensor:
    """(B, T) vocabulary-id labels -> alphabet indices through a (V,) ``lookup`` table (vocabulary id -> its
    alphabet index, -1 for every other id: :attr:`LoRAForecaster.label_lookup`); ``IGNORE_INDEX`` stays.

    With ``check`` (a host sync) a label outside the alphabet raises ValueError naming it; without, it takes no loss.
    """
    keep = labels != IGNORE_INDEX
    in_vocab = (labels >= 0) & (labels < lookup.numel())
    mapped = torch.where(keep & in_vocab, lookup[labels.clamp(0, lookup.numel() - 1)], -1)
    bad = keep & (mapped < 0)
    if check and bad.any():
        ids = sorted(set(labels[bad].tolist()))[:8]
        raise UserError(f"labels {ids} are not LLMTIME alphabet tokens ({ALPHABET!r}): the alphabet head (and "
                         f"val/loss_alphabet) score only those; labels outside it must be {IGNORE_INDEX}")
    return torch.where(keep & ~bad, mapped, IGNORE_INDEX)


def constant_schedule(optimizer: torch.optim.Optimizer, total_steps: int) -> None:
    """``scheduler=none``: the optimizer's learning rate throughout (no scheduler object)."""
    return None


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int,
                    min_lr_ratio: float) -> torch.optim.lr_scheduler.LRScheduler:
    """``scheduler=cosine``: linear warmup, then cosine decay to ``min_lr_ratio x lr`` at ``total_steps`` (>= 1)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class LoRAForecaster(pl.LightningModule):
    """Trains the adapter of a PEFT model (base frozen); the keys are commented in ``conf/train.yaml``.

    Args:
        optimizer: Partial optimizer, completed with the trainable parameters only.
        scheduler: Partial ``(optimizer, total_steps) -> LRScheduler | None``, called with ``trainer.max_steps``;
            stepped every optimizer step.
        char_ids: ``LoadedModel.char_ids``; needed by ``head="alphabet"`` and for ``val/loss_alphabet``.
        step_seed: Reseed torch's RNG at every training step from ``(step_seed, global_step)``; None: never.
        compile_model: ``torch.compile`` the decoder stack in place, so parameter names and checkpoints stay.

    Raises:
        ValueError: An unknown ``head``, or ``head="alphabet"`` without ``char_ids``.
    """

    def __init__(self, model: Any, optimizer: Callable[..., torch.optim.Optimizer], scheduler: Callable[..., Any],
                 train_logit_bias: bool, grad_norm_every_n_steps: int, head: Head = "full",
                 char_ids: Mapping[str, int] | None = None, step_seed: int | None = None,
                 compile_model: bool = False) -> None:
        check_choice("model", "head", head, HEADS)
        if head == "alphabet" and char_ids is None:
            raise UserError("model.head='alphabet' needs char_ids (the alphabet's token ids, LoadedModel.char_ids)")
        super().__init__()
        # from_pretrained returns eval mode and Lightning keeps each submodule's mode: LoRA dropout would stay off.
        self.model = model.train()
        if compile_model:  # the stack is what both heads run
            decoder_stack(self.model).compile()
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.step_seed = step_seed
        output = model.get_output_embeddings()
        vocab = output.weight.shape[0]
        self.head = head
        ids = alphabet_ids(char_ids) if char_ids is not None else None
        lookup = None
        if ids is not None:
            lookup = torch.full((vocab,), -1, dtype=torch.long)
            lookup[torch.as_tensor(ids)] = torch.arange(len(ids))
        # Non-persistent: derived from the tokenizer, never checkpoint state.
        self.register_buffer("alphabet_token_ids", None if ids is None else torch.as_tensor(ids), persistent=False)
        self.register_buffer("label_lookup", lookup, persistent=False)
        # Frozen rows gathered once from the (tied) output matrix; LoRA never touches lm_head, so they stay exact.
        self.alphabet_head = AlphabetHead(output, ids) if head == "alphabet" else None
        self.logit_bias = LogitBias(len(ids) if head == "alphabet" else vocab) if train_logit_bias else None
        self.grad_norm_every_n_steps = grad_norm_every_n_steps
        # Resume loads a checkpoint that holds only the trainable tensors.
        self.strict_loading = False
        self.register_buffer("tokens_seen", torch.zeros((), dtype=torch.long))
        self._val_sums: torch.Tensor | None = None  # (loss sum, tokens, alphabet loss sum) of this validation
        self.last_validated_step: int | None = None  # the global step of the last validation (not sanity)
        self._logged_loss: torch.Tensor | None = None  # the last logging step's loss, checked for divergence
        self.parameter_counts = counts = count_parameters(self)
        log.info("parameters: trainable %s, frozen %s (%.4f%% trainable)", f"{counts.trainable:,}",
                 f"{counts.frozen:,}", 100 * counts.trainable / (counts.trainable + counts.frozen))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) ids and (B, T) 1/0 mask (None: no padding, :func:`unpadded_attention_mask`) -> (B, T, V) logits,
        (B, T, 13) with the alphabet head (with the logit bias when enabled)."""
        if attention_mask is None:
            attention_mask = unpadded_attention_mask(decoder_stack(self.model), *input_ids.shape)
        if self.alphabet_head is None:
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        else:
            # The decoder stack alone returns the final hidden states; the full-vocabulary logits never exist.
            hidden = decoder_stack(self.model)(input_ids=input_ids, attention_mask=attention_mask,
                                               use_cache=False).last_hidden_state
            logits = self.alphabet_head(hidden)
        return self.logit_bias(logits) if self.logit_bias is not None else logits

    def _loss_sums(self, batch: dict[str, Any], alphabet: bool = False, check: bool = True
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(loss_sum, n_tokens, alphabet_loss_sum)``, the last only when ``alphabet`` and char_ids are known;
        ``check`` as for :func:`alphabet_labels`."""
        # Without padding (the collator says so on the host) no 2D mask, whose check would be a host sync.
        logits = self(batch["input_ids"], batch["attention_mask"] if batch.get("padded", True) else None)
        labels = batch["labels"]
        if self.alphabet_head is not None:
            loss_sum, n = token_loss_sum(logits, alphabet_labels(labels, self.label_lookup, check))
            return loss_sum, n, loss_sum
        loss_sum, n = token_loss_sum(logits, labels)
        if not alphabet or self.alphabet_token_ids is None:
            return loss_sum, n, None
        # Log-softmax over the alphabet's columns of the full logits: the alphabet head's loss, from these logits.
        return loss_sum, n, token_loss_sum(logits[..., self.alphabet_token_ids],
                                           alphabet_labels(labels, self.label_lookup, check))[0]

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        # Each self.log costs ~0.5-0.9 ms and the labels' alphabet check is a host sync: the loggers' steps only (the
        # windows are alphabet text by construction).
        trainer, step = self._trainer, self.global_step + 1
        logging_step = trainer is None or step % trainer.log_every_n_steps == 0 or step == trainer.max_steps
        loss_sum, n, _ = self._loss_sums(batch, check=logging_step)
        loss = loss_sum / n.clamp(min=1)
        self.tokens_seen += batch["attention_mask"].sum()
        if logging_step:
            self._logged_loss = loss  # checked in on_train_batch_end
            size = batch["input_ids"].size(0)
            # Not prog_bar, which would read the value after every batch (a host sync; lvforecast.experiment.progress).
            self.log("train/loss", loss, batch_size=size)
            self.log("train/tokens_seen", self.tokens_seen.float(), batch_size=size)
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=1)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # After the callbacks, so the FLOP budget has charged the step; at logging steps only, where the loggers read
        # the loss anyway (no extra host sync).
        loss, self._logged_loss = self._logged_loss, None
        if loss is not None and not torch.isfinite(loss):
            raise DivergedError(
                f"train/loss is {loss.item()} at step {self.global_step}: training diverged, and the run stops here "
                f"with its FLOPs charged (status diverged). Fix: a lower optim.lr, or trainer.gradient_clip_val")

    def on_validation_epoch_start(self) -> None:
        self._val_sums = torch.zeros(3, device=self.device, dtype=torch.float64)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss_sum, n, alphabet_sum = self._loss_sums(batch, alphabet=True)
        # Without char_ids there is no alphabet loss; its slot is never logged.
        self._val_sums += torch.stack([loss_sum, n, loss_sum if alphabet_sum is None else alphabet_sum]).double()

    def on_train_start(self) -> None:
        """On a resume, set each LR scheduler's rate for the restored step, not the rate the checkpoint's run ended
        on (0 at the end of a cosine decay to 0), as an unbroken run would."""
        if not self.trainer.ckpt_path:
            return
        for scheduler in (config.scheduler for config in self.trainer.lr_scheduler_configs):
            if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
                scheduler._last_lr = [base * fn(scheduler.last_epoch)
                                      for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)]
                for group, rate in zip(scheduler.optimizer.param_groups, scheduler._last_lr, strict=True):
                    group["lr"] = rate

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # A run resumed from any checkpoint would log step k+1 where an unbroken run logs k (Lightning adds one on
        # restart); with one optimizer the logging step is the optimizer step count.
        self.trainer.fit_loop.epoch_loop._batches_that_stepped = self.trainer.global_step
        # A step's random draws depend on (seed, step) alone, whatever consumed the global RNG before (a resume).
        if self.step_seed is not None:
            torch.manual_seed(self.step_seed * 1_000_003 + self.global_step)

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self.last_validated_step = self.global_step
        total, tokens, alphabet = self.trainer.strategy.reduce(self._val_sums, reduce_op="sum")
        self.log("val/loss", (total / tokens.clamp(min=1)).float(), prog_bar=True, sync_dist=False)
        self.log("val/tokens", tokens.float())
        if self.alphabet_token_ids is not None:
            self.log("val/loss_alphabet", (alphabet / tokens.clamp(min=1)).float(), sync_dist=False)

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory([p for p in self.parameters() if p.requires_grad])
        scheduler = self.scheduler_factory(optimizer, total_steps=self.trainer.max_steps)
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        k = self.grad_norm_every_n_steps
        if not k or self.global_step % k or not self.loggers:
            return
        found = [(m, p) for n, p in self.model.named_parameters() if p.grad is not None and (m := _LAYER.search(n))]
        norms = {f"grad_norm/layer{int(m[1]):02d}.{m[2]}.lora_{m[3]}": p.grad.detach().norm(2) for m, p in found}
        if norms:
            # Straight to the loggers: self.log would write them only on Lightning's logging steps (stale rows).
            from lvforecast.budget.callback import logger_step

            values = dict(zip(norms, torch.stack(list(norms.values())).tolist(), strict=True))
            for logger in self.loggers:
                logger.log_metrics(values, step=logger_step(self.trainer))

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Trainable tensors plus ``tokens_seen`` (no frozen base weights, no gathered alphabet rows)."""
        names = {n for n, p in self.named_parameters() if p.requires_grad} | {"tokens_seen"}
        return {k: v for k, v in self.state_dict().items() if k in names}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = self.trainable_state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        expected = {k: tuple(v.shape) for k, v in self.trainable_state_dict().items()}
        got = {k: tuple(v.shape) for k, v in checkpoint["state_dict"].items()}
        if got != expected:
            missing, extra = sorted(expected.keys() - got.keys())[:3], sorted(got.keys() - expected.keys())[:3]
            reshaped = [f"{k}: {got[k]} in checkpoint vs {v} here" for k, v in expected.items()
                        if k in got and got[k] != v][:2]
            raise UserError(
                f"checkpoint does not match this model's adapter (missing {missing}, unexpected {extra}, "
                f"shapes {reshaped}); resume with the same model, lora.r, lora.target_modules and "
                f"lora.train_logit_bias and model.head (the alphabet head's logit bias has 13 entries) as the run "
                f"that wrote it")

    def save_adapter(self, directory: str) -> None:
        """Write the PEFT adapter (``PeftModel.from_pretrained`` loads it) and the logit bias if any: a V-vector, or
        for the alphabet head a 13-vector whose metadata records ``head=alphabet`` and the token ids it covers."""
        self.model.save_pretrained(directory)
        if self.logit_bias is not None:
            from safetensors.torch import save_file

            metadata = None
            if self.alphabet_head is not None:
                metadata = {"head": "alphabet", "token_ids": ",".join(map(str, self.alphabet_token_ids.tolist()))}
            save_file({"bias": self.logit_bias.bias.detach().cpu().contiguous()}, f"{directory}/logit_bias.safetensors",
                      metadata=metadata)
