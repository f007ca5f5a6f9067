"""Handler hooks, per-item errors, handler loading and model settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from loom.batching.config import ModelConfig, load_models_yaml, parse_serve_spec
from loom.batching.handler import Handler, ItemError, check_handler_spec, load_handler_class, run_batch

TOY = str(Path(__file__).with_name("toy_handlers.py"))


class CountingHandler(Handler):
    """Doubles numbers; a batch holding a negative number raises; strings fail in decode."""

    def __init__(self):
        self.batches: list[list] = []

    def decode(self, item):
        if not isinstance(item, int):
            raise ItemError(f"{item!r} is not an int")
        return item

    def inference(self, batch):
        self.batches.append(list(batch))
        if any(x < 0 for x in batch):
            raise ValueError("negative input")
        return [2 * x for x in batch]


def test_run_batch_runs_one_inference_for_a_clean_batch():
    handler = CountingHandler()
    results = run_batch(handler, [1, 2, 3])
    assert [r.value for r in results] == [2, 4, 6]
    assert handler.batches == [[1, 2, 3]]


def test_decode_error_fails_only_its_item_with_its_status():
    handler = CountingHandler()
    results = run_batch(handler, [1, "x", 3])
    assert [r.value for r in results] == [2, None, 6]
    assert results[1].status == 400 and "'x' is not an int" in results[1].error
    assert handler.batches == [[1, 3]]


def test_batch_error_is_isolated_to_the_bad_item():
    handler = CountingHandler()
    results = run_batch(handler, [1, 2, -1, 4, 5, 6, 7, 8])
    assert [r.value for r in results] == [2, 4, None, 8, 10, 12, 14, 16]
    assert results[2].status == 500 and "negative input" in results[2].error
    # Split in halves: the clean half runs once as a batch, the bad half is split further.
    assert handler.batches == [[1, 2, -1, 4, 5, 6, 7, 8], [1, 2, -1, 4], [1, 2], [-1, 4], [-1], [4], [5, 6, 7, 8]]


def test_postprocess_may_fail_single_items():
    class Picky(Handler):
        def postprocess(self, outputs):
            return [ItemError("too big", 413) if x > 9 else x for x in outputs]

    results = run_batch(Picky(), [1, 10])
    assert (results[0].value, results[1].status, results[1].error) == (1, 413, "too big")


def test_wrong_result_count_fails_the_items_not_the_server():
    class Short(Handler):
        def postprocess(self, outputs):
            return outputs[:1]

    results = run_batch(Short(), [1, 2])
    assert [r.value for r in results] == [1, 2]  # isolated re-runs of size 1 return one result each


def test_load_handler_from_file_module_and_builtin():
    assert load_handler_class(f"{TOY}#EchoHandler").__name__ == "EchoHandler"
    assert load_handler_class("tests.batching.toy_handlers#BrokenSetupHandler").__name__ == "BrokenSetupHandler"
    assert load_handler_class("embedding").__name__ == "EmbeddingHandler"
    with pytest.raises(ValueError, match="exactly one Handler subclass"):
        load_handler_class(TOY)
    with pytest.raises(ValueError, match="no Handler subclass named"):
        load_handler_class(f"{TOY}#Nope")
    with pytest.raises(ValueError, match="not found"):
        load_handler_class("/nonexistent/handler.py")


def test_check_handler_spec_does_not_import_user_code():
    check_handler_spec(f"{TOY}#EchoHandler")
    check_handler_spec("image-classifier")
    with pytest.raises(ValueError, match="neither a built-in"):
        check_handler_spec("no_such_module_xyz")


def test_serve_spec_and_validation():
    config = parse_serve_spec(f"echo={TOY}#EchoHandler", batch_size=4, workers=2)
    assert (config.name, config.handler, config.path, config.batch_size, config.workers) == (
        "echo", f"{TOY}#EchoHandler", None, 4, 2)
    config = parse_serve_spec(f"vit=image-classifier:{Path(__file__).parent}")
    assert config.path == str(Path(__file__).parent)
    with pytest.raises(ValueError, match="NAME=HANDLER"):
        parse_serve_spec("minilm")
    with pytest.raises(ValueError, match="does not exist"):
        parse_serve_spec("vit=image-classifier:/no/such/folder")
    with pytest.raises(ValueError, match="batch_size must be in 1..1024"):
        ModelConfig("m", "embedding", batch_size=0)
    with pytest.raises(ValueError, match="model name"):
        ModelConfig("bad name!", "embedding")


def test_models_yaml(tmp_path):
    path = tmp_path / "models.yaml"
    path.write_text(f"models:\n  echo:\n    handler: {TOY}#EchoHandler\n    batch_size: 16\n"
                    "  minilm:\n    handler: embedding\n")
    configs = load_models_yaml(path, batch_size=4, workers=2)
    assert [(c.name, c.batch_size, c.workers) for c in configs] == [("echo", 16, 2), ("minilm", 4, 2)]
    path.write_text("models:\n  echo:\n    handler: x\n    batchsize: 3\n")
    with pytest.raises(ValueError, match="unknown settings"):
        load_models_yaml(path)
