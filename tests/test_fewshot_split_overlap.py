SCRIPT_NAME = "fewshot_split_overlap"


def test_overlap_counts_items_shared_between_seed_splits(shared_data_dir, script, capsys):
    script.main(["--data-dir", str(shared_data_dir), "--limit", "100000"])
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines()[2:]]
    by_task = {row[0].strip("| "): row for row in rows}
    assert set(by_task) == set(script.TASKS)
    # Whole files: the first pair's count is the lines the two raw files share, counted
    # without the script's loader.
    files = shared_data_dir / "cl" / "fewshot" / "ag_news"
    lines = {
        split: set((files / split / "test.txt").read_text().splitlines())
        for split in ("0_42", "1_142")
    }
    assert by_task["fewshot_agnews"][2] == str(len(lines["0_42"] & lines["1_142"]))
    assert by_task["fewshot_agnews"][1] == str(len(lines["0_42"]))


def test_a_sample_is_a_subset_of_its_whole_file(shared_data_dir, script):
    whole = script.evaluated_items("fewshot_amazon", "0_42", "test", None, shared_data_dir)
    sample = script.evaluated_items("fewshot_amazon", "0_42", "test", 50, shared_data_dir)
    assert len(sample) == 50 and sample <= whole


def test_limit_is_checked(script, user_error):
    with user_error("--limit 0"):
        script.main(["--limit", "0"])
