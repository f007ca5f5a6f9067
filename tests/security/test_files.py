"""Files: wildcards only inside their folders (finding 1), the management token file (6), finetune state loaded
without unpickling code (9), image outputs pruned and history private (10)."""

from __future__ import annotations

import json
import os
import pickle
import stat
from pathlib import Path

import httpx
import pytest
import torch

from loom.batching.management import write_token_file
from loom.finetune.checkpoint import load_checkpoint
from loom.image import wildcards
from loom.image.jobs import SUCCEEDED, JobQueue
from loom.image.request import ImageRequest
from tests.security.conftest import AUTH


@pytest.fixture()
def secret(tmp_path) -> Path:
    path = tmp_path / "secret.txt"
    path.write_text("TOPSECRET-line-1\nTOPSECRET-line-2\n")
    return path


def test_a_wildcard_never_reads_a_path(stack, secret):
    """Before: __/abs/path__ read any .txt file on disk into revised_prompt, history.jsonl and the PNG."""
    stem = str(secret.with_suffix(""))
    relative = os.path.relpath(stem, wildcards.PACKAGED_DIR)
    prompt = f"a __{stem}__ and __{relative}__ " * 3
    with httpx.Client(base_url=stack.url, headers=AUTH, timeout=120) as client:
        r = client.post("/v1/images/generations", json={"prompt": prompt, "size": "64x64", "steps": 1})
        assert r.status_code == 200, r.text
        assert "TOPSECRET" not in r.text
        assert r.json()["data"][0]["revised_prompt"] == prompt  # not wildcards at all: the text stays as written
        history = stack.images.queue.output_dir / "history.jsonl"
        assert "TOPSECRET" not in history.read_text()


def test_an_unknown_wildcard_is_400_without_server_paths(stack):
    with httpx.Client(base_url=stack.url, headers=AUTH, timeout=60) as client:
        r = client.post("/v1/images/jobs", json={"prompt": "a __no_such_wildcard__", "steps": 1})
    assert r.status_code == 400
    message = r.json()["detail"]
    assert "__no_such_wildcard__" in message
    assert str(wildcards.PACKAGED_DIR) not in message and "/" not in message.replace("/v1/images/options", "")


def test_wildcard_names_are_plain_and_symlinks_stay_inside(tmp_path, secret, monkeypatch):
    folder = tmp_path / "wild"
    folder.mkdir()
    (folder / "ok.txt").write_text("fine\n")
    (folder / "evil.txt").symlink_to(secret)
    monkeypatch.setenv("LOOM_WILDCARDS", str(folder))
    assert wildcards.expand_wildcards("__ok__", seed=0) == "fine"
    for name in ("evil", "../wild/ok", str(secret.with_suffix("")), "ok/../ok"):
        with pytest.raises(ValueError) as info:
            wildcards.wildcard_options(name)
        assert str(tmp_path) not in str(info.value)
    assert "evil" not in wildcards.list_wildcards()


def test_wildcards_cannot_grow_a_prompt_without_bound(tmp_path, monkeypatch):
    folder = tmp_path / "wild"
    folder.mkdir()
    (folder / "boom.txt").write_text("__boom__ __boom__ __boom__ __boom__\n")
    monkeypatch.setenv("LOOM_WILDCARDS", str(folder))
    with pytest.raises(ValueError, match="grew past"):
        wildcards.expand_wildcards("__boom__ " * 20, seed=0)


def test_token_file_is_private_even_if_it_existed_and_never_follows_a_link(tmp_path):
    path = tmp_path / "token.json"
    path.write_text("old")
    path.chmod(0o644)
    write_token_file(path, "t1")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text()) == {"management": "t1"}
    target = tmp_path / "elsewhere.txt"
    target.write_text("keep me")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    with pytest.raises(OSError):
        write_token_file(link, "t2")
    assert target.read_text() == "keep me"


class _Payload:
    """Unpickling this runs Path.touch(marker): what a malicious state.pt could do with any function."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_finetune_state_is_loaded_without_running_pickled_code(tmp_path):
    model = torch.nn.Linear(2, 2)
    ckpt = tmp_path / "step-000001"
    ckpt.mkdir()
    from safetensors.torch import save_file

    save_file({n: p.detach().clone() for n, p in model.named_parameters()}, str(ckpt / "trainable.safetensors"))
    marker = tmp_path / "pwned"
    torch.save({"optimizer": _Payload(marker)}, ckpt / "state.pt", pickle_protocol=pickle.HIGHEST_PROTOCOL)
    (ckpt / "trainer.json").write_text(json.dumps({"step": 1}))
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(ckpt, model, optimizer, scheduler)
    assert not marker.exists()


def _req(seed: int) -> ImageRequest:
    return ImageRequest(prompt="a sneaker", seed=seed, steps=1, width=64, height=64)


def test_image_outputs_are_pruned_and_history_is_private(tiny_image_engine, tmp_path):
    out = tmp_path / "out"
    stale = out / "0123456789abcdef"
    stale.mkdir(parents=True)
    (stale / "0.png").write_bytes(b"old")
    mine = out / "my-photos"
    mine.mkdir()
    (out / "history.jsonl").write_text("")
    (out / "history.jsonl").chmod(0o644)
    queue = JobQueue(tiny_image_engine, out, max_queued=8, keep_jobs=2)
    queue.start()
    try:
        jobs = [queue.submit(_req(seed)) for seed in range(4)]
        for job in jobs:
            assert queue.wait(job.id, timeout=120).status == SUCCEEDED
        queue.submit(_req(9))  # admission trims the in-memory history (and its files) too
    finally:
        queue.stop(drain=True)
    history = out / "history.jsonl"
    lines = history.read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == [queue.jobs()[1].id, queue.jobs()[0].id]
    assert stat.S_IMODE(history.stat().st_mode) == 0o600
    folders = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert folders == sorted([queue.jobs()[0].id, queue.jobs()[1].id, "my-photos"])
    assert not stale.exists() and mine.is_dir()


def test_history_is_private_even_if_it_existed(tiny_image_engine, tmp_path):
    history = tmp_path / "history.jsonl"
    history.write_text("")
    history.chmod(0o644)
    queue = JobQueue(tiny_image_engine, tmp_path, keep_jobs=10)
    queue.start()
    try:
        assert queue.wait(queue.submit(_req(1)).id, timeout=120).status == SUCCEEDED
    finally:
        queue.stop(drain=True)
    assert stat.S_IMODE(history.stat().st_mode) == 0o600 and len(history.read_text().splitlines()) == 1
