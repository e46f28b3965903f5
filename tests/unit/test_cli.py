
import pytest

from tests.helpers import cli
from toolkit import commands
from toolkit.submit import build_parser, main


def test_help_lists_every_stage():
    out = cli("--help")
    assert out.returncode == 0
    for stage in ("extract", "train-saes", "report", "align", "evaluate", "pipeline", "status", "cancel"):
        assert stage in out.stdout


def test_a_stage_takes_the_flags_of_its_registered_sections(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["report", "--help"])
    text = capsys.readouterr().out
    assert "--n-boot" in text and "--bands" in text and "--sae-width" not in text and "--lora-r" not in text


@pytest.mark.parametrize("stage", list(commands.COMMANDS))
def test_every_stage_has_help_and_the_common_flags(stage, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([stage, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--preset", "--config", "--run", "--langs", "--corpus", "--max-sentences", "--layers",
                 "--executor", "--dry-run", "--debug"):
        assert flag in text, f"{stage} lacks {flag}"


def test_unknown_language_exits_2_with_valid_codes_and_no_traceback():
    out = cli("extract", "--langs", "xx")
    assert out.returncode == 2
    assert "unknown language code 'xx'" in out.stderr and "en, zh, ru, es, it, id, ca, mr, ml, hi" in out.stderr
    assert "Traceback" not in out.stderr


def test_debug_shows_the_traceback():
    out = cli("extract", "--langs", "xx", "--debug")
    assert out.returncode != 0 and "Traceback" in out.stderr


def test_bad_flag_value_exits_2():
    assert cli("extract", "--executor", "cloud").returncode == 2
    assert cli("extract", "--batch-tokens", "many").returncode == 2


def test_missing_corpus_folder_is_a_user_error(tmp_path):
    assert main(["extract", "--corpus", f"text:{tmp_path / 'nope'}", "--dry-run"]) == 2


def test_dry_run_prints_config_and_plan_without_loading_a_model(tmp_path):
    out = cli("extract", "--preset", "tiny", "--langs", "en,hi", "--max-sentences", "5", "--run", str(tmp_path),
              "--layers", "0-3", "--dry-run")
    assert out.returncode == 0, out.stderr
    assert "preset: tiny" in out.stdout and "batch_tokens: 1024" in out.stdout
    assert "bytes per token" in out.stdout and "layers: [0, 1, 2, 3]" in out.stdout
    assert "hi" in out.stdout and "total" in out.stdout
    assert not (tmp_path / "activations").exists()


def test_dry_run_of_a_stage_that_reads_no_corpus_shows_the_config_only(tmp_path):
    out = cli("report", "--preset", "tiny", "--run", str(tmp_path), "--dry-run")
    assert out.returncode == 0, out.stderr
    assert "preset: tiny" in out.stdout and "bytes per token" not in out.stdout and "report" in out.stdout


def test_config_file_via_cli(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("preset: tiny\nlangs: en,ml\nextract: {batch_tokens: 333}\n")
    out = cli("extract", "--config", str(path), "--batch-tokens", "0", "--dry-run")
    assert out.returncode == 2 and "extract.batch_tokens must be at least 1" in out.stderr
    out = cli("extract", "--config", str(path), "--max-sentences", "3", "--dry-run")
    assert out.returncode == 0 and "batch_tokens: 333" in out.stdout and "max_sentences: 3" in out.stdout
