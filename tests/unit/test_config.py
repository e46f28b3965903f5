import subprocess
import sys

import pytest

from tests.conftest import ROOT
from toolkit.cluster.chain import stage_list
from toolkit.config import Config
from toolkit.errors import UserError
from toolkit.layers import parse_layers


def test_defaults_are_the_embedded_preset():
    cfg = Config.build()
    assert cfg.run.preset == "embedded" and cfg.model.name == "embedded" and cfg.sae.source == "auto"
    assert cfg.sae.id_template == "layer_{i}_width_16k_l0_small"


def test_precedence_cli_over_yaml_over_preset(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("preset: tiny\nlangs: en,hi\nsae: {width: 512, l1: 2.5}\nextract: {batch_tokens: 300}\n")
    cfg = Config.build({"sae": {"width": 64}}, str(path))
    assert cfg.run.preset == "tiny" and cfg.model.name == "tiny"  # preset named in YAML applies
    assert cfg.sae.width == 64  # CLI beats YAML
    assert cfg.sae.l1 == 2.5 and cfg.extract.batch_tokens == 300  # YAML beats preset
    assert cfg.sae.train_tokens == 8000  # preset beats defaults
    assert cfg.lang_codes == ["en", "hi"]


def test_falsy_cli_values_are_kept(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("max_sentences: 50\nextract: {save_resid: true}\nalign: {lambda_keep: 2.0}\n")
    cfg = Config.build({"run": {"max_sentences": 0}, "extract": {"save_resid": False},
                        "align": {"lambda_keep": 0.0}}, str(path))
    assert cfg.run.max_sentences == 0 and cfg.extract.save_resid is False and cfg.align.lambda_keep == 0.0


@pytest.mark.parametrize(
    "values, message",
    [
        ({"extract": {"batch_tokens": 0}}, "extract.batch_tokens must be at least 1"),
        ({"sae": {"source": "hub"}}, "sae.source"),
        *(({"sae": {"source": bad}}, "sae.source") for bad in ("pretrained:", "dir:", "auto:x", "local:ab12")),
        ({"run": {"langs": "en,xx"}}, "unknown language code 'xx'"),
        ({"run": {"executor": "slurm"}}, "run.cluster"),
        ({"report": {"bands": "0-3,4-8"}}, "report.bands"),
        ({"eval": {"tasks": "arc,gsm8k"}}, "eval.tasks"),
        ({"align": {"heldout": 1.5}}, "align.heldout"),
        ({"run": {"container": "image.img"}}, "run.container"),
        ({"sae": {"width": "wide"}}, "sae.width must be an integer"),
        ({"bogus": {"x": 1}}, "unknown config section"),
        ({"sae": {"nope": 1}}, "unknown config field sae.nope"),
    ],
)
def test_validation_names_the_field(values, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        Config.build(values)


def test_yaml_errors(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        Config.build(yaml_path=str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1,\n")
    with pytest.raises(UserError, match="not valid YAML"):
        Config.build(yaml_path=str(bad))
    with pytest.raises(UserError, match="unknown preset"):
        Config.build({"run": {"preset": "huge"}})


def test_bands_are_checked_when_the_config_is_built():
    assert Config.build({"report": {"bands": "0-8,9-17,18-25"}}).report.bands == "0-8,9-17,18-25"
    with pytest.raises(UserError, match="report.bands .*must not overlap"):
        Config.build({"report": {"bands": "0-8,5-17,18-25"}})


@pytest.mark.parametrize("spec, message", [("-1", "not negative"), ("-5", "not negative"), ("::0", "stride"),
                                           ("0-5:0", "stride"), ("0,", "cannot parse ''"), ("9-3", "reversed")])
def test_parse_layers_refuses_what_it_used_to_guess(spec, message):
    with pytest.raises(UserError, match=message):
        parse_layers(spec, 26)


@pytest.mark.parametrize("values, message", [
    ({"sae": {"width": 8.7}}, r"sae.width must be an integer \(got 8.7, a float\)"),
    ({"sae": {"width": True}}, "sae.width must be an integer"),
    ({"extract": {"save_resid": "yes"}}, "extract.save_resid must be a boolean"),
    ({"run": {"langs": False}}, "run.langs must be a string"),
    ({"sae": {"l1": float("nan")}}, "sae.l1 must be a finite number"),
    ({"align": {"lr": 0.0}}, "align.lr must be a finite number greater than 0"),
    ({"align": {"lora_dropout": 1.0}}, r"align.lora_dropout must be in \[0, 1\)"),
    ({"align": {"align_layers": "-2"}}, "align.align_layers: cannot parse"),
])
def test_lossy_or_meaningless_values_are_refused(values, message):
    with pytest.raises(UserError, match=message):
        Config.build(values)


def test_lossless_values_are_converted():
    cfg = Config.build({"sae": {"width": 64.0, "lr": 1, "train_tokens": "500"}, "run": {"langs": ["en", "hi"],
                                                                                          "layers": 3}})
    assert (cfg.sae.width, cfg.sae.lr, cfg.sae.train_tokens) == (64, 1.0, 500)
    assert (cfg.run.langs, cfg.run.layers) == ("en,hi", "3")


def test_pipeline_stages_come_from_the_registry():
    cfg = Config.build({"run": {"stages": "extract,status"}})
    with pytest.raises(UserError, match="choose from train-saes, extract, report, align, evaluate"):
        stage_list(cfg, "pipeline")
    assert stage_list(Config.build({"run": {"stages": "extract, report"}}), "pipeline") == ["extract", "report"]


def test_the_config_does_not_import_the_analysis_package():
    code = "import sys, toolkit.config; print(sorted(m for m in sys.modules if m.split('.')[0] == 'analysis'))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr
