"""Background batch preparation (``data.prefetch``): the same batches as on the training thread, a
state that counts only the batches handed out, and exact resume of a real trainer with it on."""

import threading

import numpy as np
import pytest
import torch
from test_checkpoint import launch, losses, write_corpus

from bltdist.data import PackedByteLoader
from bltdist.errors import DataError
from bltdist.patching.rules import patch_lengths, patch_starts


def sample_documents(count: int = 30) -> list[bytes]:
    return [f"document {i}: ".encode() + bytes(range(i % 7, 200, 3 + i % 5)) for i in range(count)]


class CountingEntropies:
    """Entropies that name their token (document * 1000 + position); fails on ``failing`` documents."""

    def __init__(self, failing: int | None = None):
        self.failing, self.threads = failing, set()

    def span(self, document_index: int, start: int, stop: int) -> np.ndarray:
        self.threads.add(threading.current_thread().name)
        if document_index == self.failing:
            raise DataError(f"document {document_index}: entropies cannot be read")
        return (document_index * 1000 + np.arange(start, stop)).astype(np.float32)


def loader(prefetch: int, entropies: CountingEntropies | None = None) -> PackedByteLoader:
    return PackedByteLoader(sample_documents(), seq_len=48, micro_batch_size=3, dp_rank=1, dp_size=2, seed=5,
                            entropy_source=entropies or CountingEntropies(), prefetch=prefetch)  # fmt: skip


def take(source: PackedByteLoader, count: int) -> list[torch.Tensor]:
    return [torch.cat(source.next_batch_with_entropies(), dim=1) for _ in range(count)]


def test_prefetched_batches_equal_the_plain_ones_and_the_state_counts_only_consumed_batches():
    plain = take(loader(prefetch=0), 20)
    entropies = CountingEntropies()
    ahead = loader(prefetch=4, entropies=entropies)
    assert all(torch.equal(a, b) for a, b in zip(take(ahead, 7), plain[:7]))
    assert entropies.threads == {"bltdist-prefetch"}, "entropies are prepared off the training thread"
    state = ahead.state_dict()
    assert state["global_sequences_consumed"] == 7 * 3 * 2, "prefetched batches are not consumed"
    resumed = loader(prefetch=2)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(take(resumed, 6), plain[7:13]))
    rewound = dict(state, global_sequences_consumed=2 * 3 * 2)
    ahead.load_state_dict(rewound)  # the running thread is ahead of the new position: it starts afresh
    assert all(torch.equal(a, b) for a, b in zip(take(ahead, 5), plain[2:7]))
    ahead.close()
    resumed.close()
    assert not any(thread.name == "bltdist-prefetch" for thread in threading.enumerate())


def entropy_patch_lengths(inputs: torch.Tensor, entropies: torch.Tensor) -> torch.Tensor:
    return patch_lengths(patch_starts(inputs, "entropy", entropies=entropies % 7, threshold=5.0))  # 1 byte in 7


def test_patch_lengths_are_cut_with_the_batch_on_the_prefetch_thread():
    threads = set()

    def cut(inputs: torch.Tensor, entropies: torch.Tensor) -> torch.Tensor:
        threads.add(threading.current_thread().name)
        return entropy_patch_lengths(inputs, entropies)

    ahead = loader(prefetch=2)
    ahead.patch_lengths = cut
    plain = loader(prefetch=0)
    for _ in range(5):
        inputs, targets, entropies, lengths = ahead.next_training_batch()
        assert all(torch.equal(a, b) for a, b in zip((inputs, targets, entropies), plain.next_batch_with_entropies()))
        assert torch.equal(lengths, entropy_patch_lengths(inputs, entropies))
        assert 1 < lengths.shape[1] < inputs.shape[1], "the threshold cuts some patches, not every byte"
    assert threads == {"bltdist-prefetch"}, "patch lengths are cut off the training thread"
    ahead.close()
    assert plain.next_training_batch()[3] is None, "no patch lengths without patch_lengths"


def test_an_error_on_the_background_thread_is_raised_by_the_batch_it_belongs_to():
    plain = loader(prefetch=0)
    failing = next(index for index in range(100) if any(
        document == 4 for sequence in range(index * 6 + 3, index * 6 + 6)
        for document, _, _ in plain.streams[0].pieces(sequence * 48, 48)))  # fmt: skip
    ahead = loader(prefetch=3, entropies=CountingEntropies(failing=4))
    take(ahead, failing)
    with pytest.raises(DataError, match="document 4: entropies cannot be read"):
        ahead.next_batch_with_entropies()
    ahead.close()


@pytest.mark.slow
def test_killed_mid_training_with_prefetch_resumes_bitwise(tmp_path):
    (tmp_path / "corpus").mkdir()
    corpus = write_corpus(tmp_path / "corpus", 8)
    data = f"--data.path={corpus}"
    reference = launch("single", [data, f"--output_dir={tmp_path / 'reference'}", "--data.prefetch=0"])
    assert reference.returncode == 0, reference.stderr[-4000:]
    args = [data, f"--output_dir={tmp_path / 'run'}", "--data.prefetch=4"]
    killed = launch("single", args, worker=["kill-after-step", "5"])
    assert killed.returncode == -9, killed.stderr[-4000:]
    resumed = launch("single", [*args, "--checkpoint.resume=auto"])
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "after step 3" in resumed.stdout
    assert losses(tmp_path / "run") == losses(tmp_path / "reference")  # bitwise, prefetch on or off
