"""The TRL baseline's data (benchmarks/trl_dpo.py): the same pairs as maxlm's DPO step."""

import numpy as np
import pytest

from benchmarks import post_training, trl_dpo

PAIRS, LENGTH = 6, 8  # pairs of [prompt, reply] conversations, LENGTH ids each, half prompt


def test_maxlm_rows_hold_each_pairs_prompt_once_then_both_replies():
  pairs = post_training.preference_pairs(np.random.default_rng(0), PAIRS, LENGTH, vocab=100)
  rows = post_training.preference_rows(pairs, pairs_per_row=3)
  assert rows["tokens"].shape == (2, 3 * 3 * LENGTH // 2)  # filled exactly, no padding
  found = []
  for row in range(2):
    for segment in (1, 2, 3):
      where = rows["segment_ids"][row] == segment
      tokens, branch = rows["tokens"][row][where], rows["branch_ids"][row][where]
      assert rows["loss_mask"][row][where].tolist() == (branch != 0).tolist()
      found.append({"prompt": tokens[branch == 0].tolist(), "chosen": tokens[branch == 1].tolist(),
                    "rejected": tokens[branch == 2].tolist()})
  assert found == pairs


def test_the_word_tokenizer_gives_back_the_ids_with_eos_ending_each_reply():
  pytest.importorskip("transformers", reason="needs the bench extra: pip install -e .[bench]")
  example = {"prompt": [5, 17, 99], "chosen": [12, 40], "rejected": [7, 1000]}
  row = trl_dpo._text_rows([example])[0]  # pylint: disable=protected-access
  tokenizer = trl_dpo._word_tokenizer(1024)  # pylint: disable=protected-access
  assert tokenizer(row["prompt"] + row["chosen"])["input_ids"] == [5, 17, 99, 12, trl_dpo.EOS_ID]
  assert tokenizer(row["prompt"] + row["rejected"])["input_ids"] == [5, 17, 99, 7, trl_dpo.EOS_ID]
  assert row["chosen"].endswith(tokenizer.eos_token)
