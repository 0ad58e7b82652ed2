import numpy as np
import pytest
from transformers import AutoTokenizer

from herllm.acquire.chunks import Packer, StreamPosition, to_batch, tokenize_document
from herllm.acquire.sources import Document


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def make_docs(n=12):
    return [Document(f"d#{i}", (f"word{i} ") * (3 + 7 * (i % 5))) for i in range(n)]


def test_windows_pack_the_whole_stream_in_order(tok):
    docs = make_docs()
    windows = list(Packer(tok, 16).windows(iter(docs)))
    stream = [t for d in docs for t in tokenize_document(d, tok)[0]]
    packed = np.concatenate([w.input_ids[: w.n_tokens] for w in windows]).tolist()
    assert packed == stream  # nothing dropped, nothing repeated
    assert all(w.n_tokens == 16 for w in windows[:-1])
    assert len({w.key for w in windows}) == len(windows)


@pytest.mark.parametrize("cut", [0, 1, 3, 5, 8])
def test_resume_from_any_position_gives_the_same_rest(tok, cut):
    docs = make_docs()
    packer = Packer(tok, 16)
    full, positions = [], []
    for w in packer.windows(iter(docs)):
        full.append(w)
        positions.append(StreamPosition(**vars(packer.position)))
    resumed = list(Packer(tok, 16, start=positions[cut]).windows(iter(docs)))
    assert [w.key for w in resumed] == [w.key for w in full[cut + 1 :]]
    for a, b in zip(resumed, full[cut + 1 :], strict=True):
        assert np.array_equal(a.input_ids, b.input_ids)


def test_resume_with_changed_stream_is_refused(tok):
    docs = make_docs()
    packer = Packer(tok, 16)
    it = packer.windows(iter(docs))
    for _ in range(3):
        next(it)
    changed = [Document(f"other#{i}", d.text) for i, d in enumerate(docs)]
    with pytest.raises(ValueError, match="the stream changed since the checkpoint"):
        list(Packer(tok, 16, start=packer.position).windows(iter(changed)))


def test_prompt_tokens_carry_no_loss(tok):
    doc = Document("qa:1", "What is two plus two?", "Four.")
    ids, mask = tokenize_document(doc, tok)
    n_prompt = len(tok("What is two plus two?", add_special_tokens=False)["input_ids"])
    assert not any(mask[: 1 + n_prompt])  # bos + prompt
    assert all(mask[1 + n_prompt :])  # response + eos
    w = next(Packer(tok, 64).windows(iter([doc])))
    batch = to_batch([w])
    assert (batch["labels"][0, : 1 + n_prompt] == -100).all()
    assert (batch["labels"][0, w.n_tokens :] == -100).all()  # padding
    assert batch["attention_mask"][0, w.n_tokens :].sum() == 0
