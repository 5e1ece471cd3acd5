"""The loopback Hub answers what the libraries ask of the real one: the `datasets` library resolves a dataset repo's
configs, splits and data files against it through huggingface_hub's file system, as it would against the Hub."""

from __future__ import annotations

import pytest
from huggingface_hub import HfApi, constants

from ckpt_trace.testing import LoopbackHub

LAYOUTS = {  # files of a dataset repo whose card declares no configs -> the splits `datasets` infers
    "named": ({"training.jsonl": b"{}\n", "testing.jsonl": b"{}\n"}, {"train": ["training.jsonl"], "test": ["testing.jsonl"]}),
    "no-train": ({"data/val.parquet": b"x", "data/part-0.parquet": b"y"}, {"validation": ["data/val.parquet"]}),
    "eval-only": ({"eval.jsonl": b"{}\n"}, {"test": ["eval.jsonl"]}),
    "folders": ({"data/train/0.jsonl": b"{}\n", "data/train/1.jsonl": b"{}\n", "data/validation/0.jsonl": b"{}\n",
                 ".hidden/train.jsonl": b"{}\n"},
                {"train": ["data/train/0.jsonl", "data/train/1.jsonl"], "validation": ["data/validation/0.jsonl"]}),
}


@pytest.fixture
def hub(monkeypatch, tmp_path):
    import datasets.config

    with LoopbackHub() as server:
        monkeypatch.setattr(constants, "ENDPOINT", server.url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(datasets.config, "HF_ENDPOINT", server.url)
        monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
        # Online, whatever the process read when it first imported datasets (its config keeps the offline flag).
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", False)
        yield server


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_datasets_resolves_a_dataset_repo_against_the_loopback_hub(hub, layout):
    from datasets import load_dataset_builder

    files, splits = LAYOUTS[layout]
    commit = hub.add_revision(f"org/{layout}", "main", files, repo_type="dataset")
    builder = load_dataset_builder(f"org/{layout}")
    prefix = f"hf://datasets/org/{layout}@{commit}/"
    assert {str(split): [str(f).removeprefix(prefix) for f in found]
            for split, found in builder.config.data_files.items()} == splits


def test_the_tree_lists_a_folder_level_by_level_or_whole_and_paths_info_names_files_and_folders(hub):
    commit = hub.add_revision("org/tree", "main", {"a.jsonl": b"1", "data/b.jsonl": b"22", "data/deep/c.parquet": b"3"},
                              repo_type="dataset")
    api = HfApi()

    def listed(**kwargs) -> list[tuple[str, str]]:
        return [(type(e).__name__, e.path) for e in api.list_repo_tree("org/tree", repo_type="dataset", **kwargs)]

    assert listed() == [("RepoFolder", "data"), ("RepoFile", "a.jsonl")]
    assert listed(path_in_repo="data") == [("RepoFolder", "data/deep"), ("RepoFile", "data/b.jsonl")]
    assert listed(recursive=True) == [("RepoFolder", "data"), ("RepoFolder", "data/deep"), ("RepoFile", "a.jsonl"),
                                      ("RepoFile", "data/b.jsonl"), ("RepoFile", "data/deep/c.parquet")]
    info = api.get_paths_info("org/tree", ["data/b.jsonl", "data/deep", "missing"], repo_type="dataset")
    assert [(type(e).__name__, e.path, getattr(e, "size", None)) for e in info] == [
        ("RepoFile", "data/b.jsonl", 2), ("RepoFolder", "data/deep", None)]
    assert api.dataset_info("org/tree").sha == commit
