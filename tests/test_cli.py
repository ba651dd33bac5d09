"""Command lines end bad input with one clear line and exit status 2, not a traceback."""

from __future__ import annotations

import socket

import pytest

from .conftest import REPO


def test_submit_to_an_address_where_no_cluster_answers(capsys):
    from pipeline.runtime.submit import main

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        address = f"http://127.0.0.1:{sock.getsockname()[1]}"
    with pytest.raises(SystemExit) as exit_:
        main(["--address", address, "--project", str(REPO), "--no-wait"])
    assert exit_.value.code == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"python -m pipeline.runtime.submit: error: no Ray Jobs API at {address}")


def test_a_stage_names_a_missing_params_file(capsys, tmp_path):
    from stages.sample import main

    with pytest.raises(SystemExit) as exit_:
        main(["--params", str(tmp_path / "nope.yaml")])
    assert exit_.value.code == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("python -m stages.sample: error: ") and "nope.yaml" in line


def test_the_steering_cli_names_a_missing_image_in_one_line_and_debug_shows_the_traceback(capsys, tmp_path):
    from pipeline.vlm.steering import main

    vlm = tmp_path / "no_vlm"
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path / "x.jpg"), "--vlm", str(vlm)])
    assert exit_.value.code == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line == f"python -m pipeline.vlm.steering: error: no image file {tmp_path / 'x.jpg'}"
    with pytest.raises(FileNotFoundError):
        main([str(tmp_path / "x.jpg"), "--vlm", str(vlm), "--debug"])
