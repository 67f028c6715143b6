"""The CLI through Typer's test runner: happy paths and one-line errors with exit code 2."""

from typer.testing import CliRunner

from cli.main import app

runner = CliRunner()


def test_init_then_validate(tmp_path):
    path = tmp_path / "exp.yaml"
    result = runner.invoke(app, ["init", str(path)])
    assert result.exit_code == 0 and path.is_file()
    result = runner.invoke(app, ["validate", str(path), "--set", "decouple.num_ranges=8"])
    assert result.exit_code == 0, result.output
    assert "8 experts, T=1000" in result.output and "875_1000" in result.output


def test_init_refuses_to_overwrite(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("seed: 3\n")
    result = runner.invoke(app, ["init", str(path)])
    assert result.exit_code == 2 and "--force" in result.output
    assert path.read_text() == "seed: 3\n"


def test_bad_key_is_one_line_with_exit_2(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("decouple:\n  stepz: 3\n")
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2
    assert "did you mean 'decouple.steps'?" in result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_boundaries_must_end_at_the_models_T(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("decouple:\n  boundaries: [0, 500, 900]\n")
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2 and "end at T=1000" in result.output


def test_debug_shows_the_traceback(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("seed: [1, 2]\n")
    result = runner.invoke(app, ["--debug", "validate", str(path)])
    assert result.exit_code != 0 and result.exception is not None


def test_train_refuses_a_non_empty_output_folder(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    result = runner.invoke(app, ["train", "--out", str(tmp_path), "--set", "decouple.steps=2"])
    assert result.exit_code == 2 and "--overwrite" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.startswith("deme-ray ")
