"""Every ```python block of README.md runs as written on a CPU, in a fresh namespace and an empty
working folder. The one file a block reads, the DALL-E ``encoder.pkl`` (the README names where to
download it), is a small stand-in here: a state dict with the official names, which
``DalleTokenizer.from_file`` reads like the official pickle."""

import re
from pathlib import Path

import pytest
import torch

from beitfast.tokenizers import DalleTokenizer

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("block", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_block_runs_on_cpu(block, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    stand_in = DalleTokenizer(n_hid=4, n_blk_per_group=1, vocab_size=8192, input_size=112)
    torch.save(stand_in.encoder.state_dict(), tmp_path / "encoder.pkl")
    threads = torch.get_num_threads()
    try:
        exec(compile(block, f"README.md python block {BLOCKS.index(block)}", "exec"), {"__name__": "readme"})
    finally:
        torch.set_num_threads(threads)
