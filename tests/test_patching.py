
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.models.blt.modeling_blt import BltPatcher, process_patch_lengths

from bltdist.patching import BOS_ID, EOS_ID, document_ids, pad_patch_lengths, patch_lengths, patch_starts
from bltdist.patching.rules import patch_ids


def doc_tokens(*documents: bytes, partial_first: bytes | None = None) -> torch.Tensor:
    """One row: an optional partial document (no BOS), then [BOS] + bytes + [EOS] per document."""
    ids = [b + 4 for b in partial_first] + [EOS_ID] if partial_first is not None else []
    for document in documents:
        ids += [BOS_ID] + [b + 4 for b in document] + [EOS_ID]
    return torch.tensor([ids])


def lengths_of(starts: torch.Tensor) -> list[int]:
    return patch_lengths(starts)[0].tolist()


# Hand-checked examples


def test_static_restarts_counting_after_every_bos():
    tokens = doc_tokens(b"abcde", b"fg")  # BOS a b c d e EOS | BOS f g EOS
    assert lengths_of(patch_starts(tokens, "static", patch_size=3)) == [1, 3, 3, 1, 3]


def test_static_counts_a_partial_first_document_from_position_one():
    tokens = doc_tokens(b"", partial_first=b"abcde")  # a b c d e EOS BOS EOS
    assert lengths_of(patch_starts(tokens, "static", patch_size=2)) == [1, 2, 2, 1, 1, 1]


def test_space_ends_a_patch_at_the_first_space_like_byte_of_a_run():
    tokens = doc_tokens(b"hi  there, ok")[:, :-1]  # BOS | hi_ | _there, | _ok
    assert lengths_of(patch_starts(tokens, "space")) == [1, 3, 7, 3]


def test_space_treats_a_utf8_lead_byte_as_space_like_and_special_tokens_as_ends():
    cafe = doc_tokens("café".encode())[:, :-1]  # c a f C3 | A9
    assert lengths_of(patch_starts(cafe, "space")) == [1, 4, 1]
    two_docs = doc_tokens(b"a b", b"c")[:, :-1]  # BOS | a_ | b EOS | BOS | c
    assert lengths_of(patch_starts(two_docs, "space")) == [1, 2, 2, 1, 1]
    special_after_space = torch.tensor([[BOS_ID, ord(" ") + 4, EOS_ID, ord("b") + 4, ord("c") + 4]])
    assert lengths_of(patch_starts(special_after_space, "space")) == [1, 2, 2]


def test_entropy_global_threshold_ignores_the_first_and_last_entropy():
    tokens = doc_tokens(b"abcdefg")[:, :-1]
    entropies = torch.tensor([[9.0, 0.5, 2.0, 0.1, 0.1, 3.0, 0.2, 5.0]])
    starts = patch_starts(tokens, "entropy", entropies=entropies, threshold=1.0)
    assert lengths_of(starts) == [1, 2, 3, 2]


def test_entropy_monotonic_compares_the_rise_of_entropy():
    tokens = doc_tokens(b"abcdefg")[:, :-1]
    entropies = torch.tensor([[0.0, 1.5, 1.0, 2.5, 2.6, 0.1, 1.5, 9.0]])
    starts = patch_starts(tokens, "entropy", entropies=entropies, threshold=1.0, threshold_mode="monotonic")
    assert lengths_of(starts) == [1, 1, 2, 3, 1]


def test_entropy_monotonic_starts_two_after_every_bos_of_a_packed_row():
    tokens = doc_tokens(b"abcd", b"efgh")  # BOS a b c d EOS | BOS e f g h EOS
    entropies = torch.tensor([[0.0, 5.0, 0.0, 0.0, 0.0, 0.0, 9.0, 0.0, 0.0, 2.0, 0.0, 0.0]])
    starts = patch_starts(tokens, "entropy", entropies=entropies, threshold=1.0, threshold_mode="monotonic")
    # Position 8 ("f") starts as the second document's position 2, though H(7) - H(6) = -9: H(6),
    # the BOS's entropy, is never compared. The first rise compared is H(8) - H(7), for position 9;
    # H(9) - H(8) = 2 starts position 10. (Patching by row position only gave [1, 1, 4, 1, 3, 2].)
    assert lengths_of(starts) == [1, 1, 4, 1, 1, 2, 2]
    alone = [patch_starts(tokens[:, :6], "entropy", entropies=entropies[:, :6], threshold=1.0,
                          threshold_mode="monotonic"),
             patch_starts(tokens[:, 6:], "entropy", entropies=entropies[:, 6:], threshold=1.0,
                          threshold_mode="monotonic")]  # fmt: skip
    assert torch.equal(starts, torch.cat(alone, dim=1))


def test_max_patch_length_cuts_long_patches_from_their_start():
    tokens = doc_tokens(b"abcdefghij")[:, :-1]
    starts = patch_starts(tokens, "static", patch_size=8, max_patch_length=3)
    assert lengths_of(starts) == [1, 3, 3, 2, 2]


def test_document_ids_and_patch_ids():
    tokens = torch.tensor([[10, EOS_ID, BOS_ID, 11, BOS_ID]])
    assert document_ids(tokens).tolist() == [[0, 0, 1, 1, 2]]
    starts = torch.tensor([[True, False, True, True, False]])
    assert patch_ids(starts).tolist() == [[0, 0, 1, 2, 2]]


def starts_of(lengths: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The starts mask that (B, P) lengths describe; zero-length (padding) patches mark nothing."""
    starts = torch.zeros(lengths.shape[0], seq_len + 1, dtype=torch.bool)
    first = torch.cumsum(lengths, dim=1) - lengths
    starts.scatter_(1, torch.where(lengths > 0, first, seq_len), True)
    return starts[:, :seq_len]


def test_lengths_are_right_padded_to_the_batch_and_to_a_multiple():
    starts = torch.tensor([[True, True, False, False], [True, True, True, True]])
    lengths = patch_lengths(starts)
    assert lengths.tolist() == [[1, 3, 0, 0], [1, 1, 1, 1]]
    assert torch.equal(starts_of(lengths, 4), starts)
    assert pad_patch_lengths(lengths, 3).tolist() == [[1, 3, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0]]
    assert pad_patch_lengths(lengths, 2) is lengths


def test_bad_arguments_are_refused():
    tokens = doc_tokens(b"abc")
    with pytest.raises(ValueError, match="unknown patching mode"):
        patch_starts(tokens, "bpe")
    with pytest.raises(ValueError, match="entropies and threshold"):
        patch_starts(tokens, "entropy", threshold=1.0)
    with pytest.raises(ValueError, match="threshold_mode"):
        patch_starts(tokens, "entropy", entropies=torch.zeros(tokens.shape), threshold=1.0, threshold_mode="x")
    with pytest.raises(ValueError, match="position 0"):
        patch_lengths(torch.tensor([[False, True]]))


# Agreement with the Hugging Face port


def test_global_entropy_patching_equals_hugging_face():
    generator = torch.Generator().manual_seed(0)
    batch, seq_len, threshold = 16, 200, 1.3354
    tokens = torch.randint(4, 260, (batch, seq_len), generator=generator)
    tokens[:, 0] = BOS_ID
    entropies = torch.rand(batch, seq_len, generator=generator) * 2.5
    ours = patch_lengths(patch_starts(tokens, "entropy", entropies=entropies, threshold=threshold))
    for row in range(batch):
        # One row at a time: the port mis-pads rows with fewer patches than the longest in a batch.
        theirs = BltPatcher.patch_lengths_from_entropies(entropies[row : row + 1], seq_len, threshold=threshold)
        assert ours[row][ours[row] > 0].tolist() == theirs[0][theirs[0] > 0].tolist()


@pytest.mark.parametrize("max_patch_length", [1, 3, 7])
def test_max_patch_length_splits_like_hugging_face(max_patch_length):
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(4, 260, (4, 300), generator=generator)
    tokens[:, 0] = BOS_ID
    entropies = torch.rand(4, 300, generator=generator) * 3
    unsplit = patch_lengths(patch_starts(tokens, "entropy", entropies=entropies, threshold=2.5))
    split = patch_lengths(
        patch_starts(tokens, "entropy", entropies=entropies, threshold=2.5, max_patch_length=max_patch_length)
    )
    assert torch.equal(split, process_patch_lengths(unsplit, max_patch_length))


# Invariants on random packed batches


def random_packed_batch(batch: int, seq_len: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    # Mostly letters and spaces so that space patching sees runs; a few other bytes and specials.
    alphabet = torch.tensor([ord(c) + 4 for c in "abc xyz09,\n"] + [0xC3 + 4, 0xA9 + 4, 0xFF + 4, 0])
    tokens = alphabet[torch.randint(len(alphabet), (batch, seq_len), generator=generator)]
    document_starts = torch.rand(batch, seq_len, generator=generator) < 0.05
    document_starts[:, 0] = torch.rand(batch, generator=generator) < 0.5  # some rows start mid-document
    tokens[document_starts] = BOS_ID
    tokens[:, :-1][document_starts[:, 1:]] = EOS_ID
    entropies = torch.rand(batch, seq_len, generator=generator) * 3
    return tokens, entropies


@pytest.mark.parametrize(
    "mode, options",
    [
        ("static", {"patch_size": 1}),
        ("static", {"patch_size": 5}),
        ("static", {"patch_size": 6, "max_patch_length": 4}),
        ("space", {}),
        ("space", {"max_patch_length": 3}),
        ("entropy", {"threshold": 1.5}),
        ("entropy", {"threshold": 2.9, "max_patch_length": 5}),
        ("entropy", {"threshold": 0.5, "threshold_mode": "monotonic"}),
    ],
)
def test_patching_invariants_on_random_packed_batches(mode, options):
    for seed in range(3):
        tokens, entropies = random_packed_batch(4, 301, seed)
        starts = patch_starts(tokens, mode, entropies=entropies if mode == "entropy" else None, **options)
        lengths = patch_lengths(starts)

        assert starts.shape == tokens.shape and starts.dtype == torch.bool
        assert (lengths.sum(dim=1) == tokens.shape[1]).all()
        real = lengths > 0
        assert torch.equal(real, torch.cummin(real.int(), dim=1).values.bool()), "zero-length patch before padding"
        if "max_patch_length" in options:
            assert lengths.max() <= options["max_patch_length"]
        assert starts[:, :2].all()
        bos = tokens == BOS_ID
        assert starts[bos].all(), "a BOS inside a patch"
        assert starts[:, 1:][bos[:, :-1]].all(), "a byte sharing its BOS's patch"
        documents = document_ids(tokens)
        continues = ~starts[:, 1:]
        assert torch.equal(documents[:, 1:][continues], documents[:, :-1][continues]), "a patch spans documents"
        assert torch.equal(starts_of(lengths, tokens.shape[1]), starts)


def random_documents(generator: torch.Generator, lengths: list[int]) -> list[torch.Tensor]:
    """Documents [BOS] + bytes (+ EOS, mostly) with the given byte counts; bytes mostly letters and spaces."""
    alphabet = torch.tensor([ord(c) + 4 for c in "ab yz9,"] + [0xC3 + 4, 0xA9 + 4])
    documents = []
    for length in lengths:
        body = alphabet[torch.randint(len(alphabet), (length,), generator=generator)]
        end = [EOS_ID] if torch.rand(1, generator=generator) < 0.8 else []
        documents.append(torch.cat([torch.tensor([BOS_ID]), body, torch.tensor(end, dtype=torch.long)]))
    return documents


def packed_rows_with_documents(seed: int) -> list[list[torch.Tensor]]:
    """Rows as lists of their documents: different lengths, some of 1-3 bytes (and a bare BOS),
    the first row starting mid-document (its first document has no BOS)."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for row in range(6):
        lengths = [int(n) for n in torch.randint(0, 40, (int(torch.randint(2, 7, (1,), generator=generator)),),
                                                  generator=generator)]  # fmt: skip
        lengths[int(torch.randint(len(lengths), (1,), generator=generator))] = row % 4  # 0-3 bytes
        documents = random_documents(generator, lengths)
        if row == 0:
            documents[0] = documents[0][1:]  # mid-document: the row starts after this document's BOS
        rows.append(documents)
    return rows


@pytest.mark.parametrize("mode", ["static", "space", "global", "monotonic"])
@pytest.mark.parametrize("max_patch_length", [None, 1, 3])
def test_packed_rows_patch_like_their_documents_patched_one_by_one(mode, max_patch_length):
    """Patching is per document: a packed row gets exactly the patches that patching each of its
    documents as a row of its own (starting with its BOS) and concatenating gives."""
    threshold = 0.6 if mode == "monotonic" else 1.5
    options = (
        {"patch_size": 4} if mode in ("static", "space")
        else {"entropies": None, "threshold": threshold, "threshold_mode": mode}
    )  # fmt: skip
    patch_mode = mode if mode in ("static", "space") else "entropy"
    compared = 0
    for seed in range(4):
        generator = torch.Generator().manual_seed(100 + seed)
        for documents in packed_rows_with_documents(seed):
            entropies = [torch.rand(len(d), generator=generator) * 3 for d in documents]
            tokens = torch.cat(documents).unsqueeze(0)
            if patch_mode == "entropy":
                options["entropies"] = torch.cat(entropies).unsqueeze(0)
            packed = patch_starts(tokens, patch_mode, max_patch_length=max_patch_length, **options)
            alone = []
            for document, document_entropies in zip(documents, entropies):
                if patch_mode == "entropy":
                    options["entropies"] = document_entropies.unsqueeze(0)
                alone.append(
                    patch_starts(document.unsqueeze(0), patch_mode, max_patch_length=max_patch_length, **options)
                )
            assert torch.equal(packed, torch.cat(alone, dim=1)), (seed, tokens.tolist())
            compared += len(documents)
    assert compared > 40


@pytest.mark.parametrize("mode, threshold_mode", [("static", None), ("space", None), ("entropy", "global"),
                                                  ("entropy", "monotonic")])  # fmt: skip
def test_patching_is_vectorised(mode, threshold_mode):
    """A Python loop over bytes would run more tensor ops on a longer batch; a vectorised rule runs
    the same ops whatever the length (counted, not timed: timings belong in benchmarks/)."""
    options = {"threshold_mode": threshold_mode} if threshold_mode else {}

    def ops_for(seq_len: int) -> int:
        tokens, entropies = random_packed_batch(8, seq_len, seed=0)
        with CountOps() as counter:
            patch_lengths(
                patch_starts(tokens, mode, entropies=entropies, threshold=1.5, max_patch_length=8, **options)
            )
        return counter.count

    assert ops_for(16384) == ops_for(1024)


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def test_degenerate_sequence_lengths():
    for seq_len in (1, 2):
        tokens = torch.full((2, seq_len), 50)
        for mode in ("static", "space", "entropy"):
            starts = patch_starts(tokens, mode, entropies=torch.zeros(2, seq_len), threshold=1.0)
            assert starts.all()
            assert patch_lengths(starts).tolist() == [[1] * seq_len] * 2
