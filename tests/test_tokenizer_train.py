

def test_signal_saves_on_all_ranks_and_exits_for_requeue(tmp_path, corpus):
    import signal
    import time
    recipe = write_recipe(tmp_path / "micro.yaml", corpus, steps=10_000, checkpoint__every=1000)
    run = tmp_path / "run"
    run.mkdir()
    cmd = [sys.executable, "-m", "videoar_megatron.cli", "tokenizer", "train", "--recipe", str(recipe),
           "--run-dir", str(run)]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    deadline = time.time() + 300
    while time.time() < deadline and not any(r.get("step", 0) >= 3 for r in _records(run)):
        time.sleep(0.5)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-3000:]
    last = max(losses(run))
    assert committed_steps(run / "checkpoints") == [last] and last >= 3
    assert "exiting with 75 for requeue" in err


def _records(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return read_metrics(path) if path.is_file() else []
