"""The TRL baseline's data (benchmarks/trl_dpo.py): the same pairs as maxlm's DPO step."""

import numpy as np
import pytest

from benchmarks import post_training, trl_dpo

ROWS, SEQ, SEGMENT = 2, 32, 8  # preference_rows packs 4 pairs a row; replies fill each second half


def test_each_pair_is_its_segments_prompt_and_replies():
  pairs = post_training.preference_rows(np.random.default_rng(0), ROWS, SEQ, vocab=100)
  chosen, rejected = pairs["chosen_tokens"], pairs["rejected_tokens"]
  expected = [{"prompt": chosen[row, start:start + SEGMENT // 2].tolist(),
               "chosen": chosen[row, start + SEGMENT // 2:start + SEGMENT].tolist(),
               "rejected": rejected[row, start + SEGMENT // 2:start + SEGMENT].tolist()}
              for row in range(ROWS) for start in range(0, SEQ, SEGMENT)]
  assert trl_dpo.preference_examples(pairs) == expected


def test_the_word_tokenizer_gives_back_the_ids_with_eos_ending_each_reply():
  pytest.importorskip("transformers", reason="needs the bench extra: pip install -e .[bench]")
  example = {"prompt": [5, 17, 99], "chosen": [12, 40], "rejected": [7, 1000]}
  row = trl_dpo._text_rows([example])[0]  # pylint: disable=protected-access
  tokenizer = trl_dpo._word_tokenizer(1024)  # pylint: disable=protected-access
  assert tokenizer(row["prompt"] + row["chosen"])["input_ids"] == [5, 17, 99, 12, trl_dpo.EOS_ID]
  assert tokenizer(row["prompt"] + row["rejected"])["input_ids"] == [5, 17, 99, 7, trl_dpo.EOS_ID]
  assert row["chosen"].endswith(tokenizer.eos_token)
