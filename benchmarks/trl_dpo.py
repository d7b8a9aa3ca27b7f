"""Hugging Face TRL's `DPOTrainer` on maxlm's model in PyTorch: the baseline of
`benchmarks/post_training.py`'s `ratio_vs_trl`.

The child process trains a `transformers` LlamaForCausalLM holding maxlm's starting parameters
(`hf_llama.to_hf_llama`), float32, with TRL's reference model (a frozen copy it makes itself)
running its forward inside every step: no precomputed reference log-probabilities. Each pair
is [prompt, reply] with maxlm's tokens, one padded row per reply as TRL batches them (maxlm
packs several pairs to a row, each prompt once). A word-level tokenizer with one
word per id makes TRL's text preprocessing give those ids back. torch, transformers and trl
come from the `bench` extra.
"""

import time

from benchmarks import train_step
from maxlm.model import ModelConfig

EOS_ID, PAD_ID = 2, 0


def _word(token_id: int) -> str:
  return f"<{token_id}>"


def _text_rows(examples: list[dict[str, list[int]]]) -> list[dict[str, str]]:
  """Each reply's last id becomes EOS, so TRL's appended EOS keeps the reply's length."""
  text = lambda ids: "".join(" " + _word(i) for i in ids)  # noqa: E731
  return [{"prompt": text(e["prompt"]), "chosen": text(e["chosen"][:-1] + [EOS_ID]),
           "rejected": text(e["rejected"][:-1] + [EOS_ID])} for e in examples]


def _word_tokenizer(vocab_size: int):
  """A transformers tokenizer mapping " <i>" to id i and back, nothing added."""
  import tokenizers  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  vocab = {_word(i): i for i in range(vocab_size)}
  tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token=_word(1)))
  tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer,
                                              eos_token=_word(EOS_ID), pad_token=_word(PAD_ID))


def _step_timer(connection):
  """A TrainerCallback that takes step counts from the parent and answers each with those
  steps' (wall s, CPU s), every step timed from `on_step_begin` to `on_step_end` (forward,
  reference forward, backward, clipping, optimizer; batch collation is left out, as maxlm's
  batch is built before its timing too)."""
  import transformers  # pylint: disable=import-outside-toplevel

  class StepTimer(transformers.TrainerCallback):
    def __init__(self):
      self.left, self.wall, self.cpu, self.started = 0, 0.0, 0.0, (0.0, 0.0)

    def on_step_begin(self, args, state, control, **kwargs):
      if self.left == 0:
        self.left, self.wall, self.cpu = connection.recv(), 0.0, 0.0
      self.started = (time.perf_counter(), train_step.process_cpu_seconds())

    def on_step_end(self, args, state, control, **kwargs):
      self.wall += time.perf_counter() - self.started[0]
      self.cpu += train_step.process_cpu_seconds() - self.started[1]
      self.left -= 1
      if self.left == 0:
        connection.send((self.wall, self.cpu))
  return StepTimer()


def _trl_worker(connection, params: dict, config: ModelConfig, examples: list, beta: float,
                learning_rate: float, total_steps: int):
  """Sends False without trl, else trains `total_steps` DPO steps paced by the parent."""
  try:
    import datasets  # pylint: disable=import-outside-toplevel
    import transformers  # pylint: disable=import-outside-toplevel
    import trl  # pylint: disable=import-outside-toplevel
    from benchmarks import hf_llama  # pylint: disable=import-outside-toplevel
  except ImportError:
    connection.send(False)
    return
  from maxlm import steps  # pylint: disable=import-outside-toplevel
  steps.keep_freed_host_memory()
  datasets.disable_progress_bars()
  model, reference = (hf_llama.to_hf_llama(params, config) for _ in range(2))
  del params
  args = trl.DPOConfig(
      output_dir="/tmp/maxlm_trl_dpo", beta=beta, loss_type=["sigmoid"], max_length=None,
      per_device_train_batch_size=len(examples), gradient_accumulation_steps=1,
      max_steps=total_steps, learning_rate=learning_rate, lr_scheduler_type="constant",
      adam_beta2=0.95, weight_decay=0.1, max_grad_norm=1.0, bf16=False, fp16=False,
      gradient_checkpointing=False, logging_steps=10**9, save_strategy="no", report_to="none",
      disable_tqdm=True, dataloader_num_workers=0, dataloader_pin_memory=False, seed=0)
  trainer = trl.DPOTrainer(model=model.train(), ref_model=reference, args=args,
                           train_dataset=datasets.Dataset.from_list(_text_rows(examples)),
                           processing_class=_word_tokenizer(config.vocab_size),
                           callbacks=[_step_timer(connection)])
  trainer.remove_callback(transformers.PrinterCallback)  # its end-of-run dict is not our output
  connection.send(True)
  trainer.train()


def trl_dpo_timer(params: dict, config: ModelConfig, examples: list[dict[str, list[int]]],
                  beta: float, learning_rate: float, total_steps: int):
  """`run(steps) -> (wall s, CPU s)` of TRL DPO steps on `examples` ({prompt, chosen,
  rejected} id lists) in a child, or None without trl; the steps asked for must add up to
  `total_steps`."""
  return train_step.child_timer(_trl_worker, params, config, examples, beta, learning_rate,
                                total_steps)
