import json

from cluster.checkpoint import MARKER, CheckpointStore, tag_for


def fake_checkpoint(root, step, complete=True):
    d = root / tag_for(step)
    d.mkdir(parents=True)
    (d / "layer_00-model_00-model_states.pt").write_bytes(b"x")
    if complete:
        (d / MARKER).write_text(json.dumps({"step": step}))
    return d


def test_half_written_checkpoints_are_never_picked(tmp_path):
    store = CheckpointStore(tmp_path, keep=5)
    fake_checkpoint(tmp_path, 10)
    fake_checkpoint(tmp_path, 20, complete=False)  # a save that died before every rank finished
    (tmp_path / tag_for(30)).mkdir()
    (tmp_path / tag_for(30) / MARKER).write_text("{not json")  # a torn marker write
    step, tag, info = store.latest()
    assert (step, tag) == (10, tag_for(10))


def test_marker_is_written_atomically_and_prune_keeps_newest(tmp_path):
    store = CheckpointStore(tmp_path, keep=2)
    for step in (5, 10, 15):
        fake_checkpoint(tmp_path, step, complete=False)
        store.mark_complete(tag_for(step), {"step": step, "epoch": 0})
        assert not list(tmp_path.glob("*/*.tmp"))
    fake_checkpoint(tmp_path, 12, complete=False)  # leftover of an interrupted save
    store.prune()
    assert [s for s, _ in store.complete()] == [10, 15]
    assert not (tmp_path / tag_for(12)).exists() and not (tmp_path / tag_for(5)).exists()


def test_empty_store(tmp_path):
    assert CheckpointStore(tmp_path / "missing").latest() is None
