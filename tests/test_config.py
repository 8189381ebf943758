"""Config loading: strict overrides with suggestions, +new keys, resolvers, scheduled scalars."""
import re
import time

import pytest
from omegaconf import OmegaConf

from utils.config import (ConfigError, argument_at_least, check_trainer_options, load_config, number_at_least,
                          scheduled, whole_step_counts)

YAML = """
name: demo-${dataset.scene}
dataset:
  scene: lego
  root: ./load/${dataset.scene}
system:
  loss:
    lambda_rgb: 1.0
    lambda_mask: [0, 0.0, 1.0, 100]
trainer:
  max_steps: 2000
  warmup: 500
derived:
  half: ${idiv:${trainer.max_steps},2}
  rate: ${calc_exp_lr_decay_rate:0.1,${sub:${trainer.max_steps},${trainer.warmup}}}
  base: ${basename:${dataset.root}}
"""


@pytest.fixture
def path(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(YAML)
    return str(p)


def test_resolvers_and_overrides(path):
    cfg = load_config(path, ["dataset.scene=chair", "trainer.max_steps=1000"])
    assert cfg.name == "demo-chair" and cfg.derived.half == 500 and cfg.derived.base == "chair"
    assert abs(cfg.derived.rate ** 500 - 0.1) < 1e-9


def test_a_path_typed_with_a_trailing_slash_or_a_tilde(path, monkeypatch, tmp_path):
    """Tab completion leaves load/lego/ (the trial name must still be lego); a shell leaves
    dataset.root=~/x unexpanded (not a variable assignment), so the config expands it."""
    assert load_config(path, ["dataset.root=./load/chair/"]).derived.base == "chair"
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = load_config(path, ["+dataset.root_dir=~/scans/dtu_scan24", "+dataset.eval_dir=~/DTU-eval",
                             "+exp_dir=~/exp", "+other=~/left"])
    assert cfg.dataset.root_dir == str(tmp_path / "scans" / "dtu_scan24")
    assert cfg.dataset.eval_dir == str(tmp_path / "DTU-eval") and cfg.exp_dir == str(tmp_path / "exp")
    assert cfg.other == "~/left", "only path options are expanded"


def test_a_tag_is_the_text_typed_not_what_yaml_reads_in_it(path, tmp_path):
    """tag=off would be YAML's false (a trial folder named "@<time>"), tag=0123 the octal 83."""
    for text in ("off", "yes", "0123", "1e-3"):
        cfg = load_config(path, [f"+tag={text}"])
        assert cfg.tag == text
    saved = tmp_path / "parsed.yaml"
    OmegaConf.save(load_config(path, ["+tag=off"]), saved)
    assert load_config(str(saved)).tag == "off", "and stays text in parsed.yaml"


def test_yaml_mistakes_are_one_line_naming_the_place(tmp_path):
    tab = tmp_path / "tab.yaml"
    tab.write_text("name: x\ndataset:\n\tname: demo\n")
    with pytest.raises(ConfigError, match=r"is not valid YAML: a tab at line 3, column 1 \(YAML indents with spaces\)\.$"):
        load_config(str(tab))
    bracket = tmp_path / "bracket.yaml"
    bracket.write_text("name: x\ndataset: {a: [1, 2}\n")
    # PyYAML's own words vary by release ("did not find expected ..." / "expected ..., but got '}'")
    with pytest.raises(ConfigError, match=r"is not valid YAML: [^\n]*expected ',' or '\]'[^\n]* at line 2, column 19\.$"):
        load_config(str(bracket))
    dangling = tmp_path / "dangling.yaml"
    dangling.write_text("model:\n  geometry:\n    radius: ${model.radius}\n")
    with pytest.raises(ConfigError, match=r"Interpolation key 'model.radius' not found \(in model.geometry.radius\)\.$"):
        load_config(str(dangling))


def test_misspelled_override_names_the_closest_key(path):
    with pytest.raises(ConfigError, match="did you mean system.loss.lambda_rgb"):
        load_config(path, ["system.loss.lamda_rgb=2"])


def test_mandatory_value_is_given_on_the_command_line(tmp_path):
    """instant-nsr-pl's Blender configs say ``scene: ???`` and are run with ``dataset.scene=lego``."""
    p = tmp_path / "c.yaml"
    p.write_text(YAML.replace("scene: lego", "scene: ???"))
    cfg = load_config(str(p), ["dataset.scene=chair"])
    assert cfg.name == "demo-chair" and cfg.dataset.root == "./load/chair"
    with pytest.raises(ConfigError, match=r"leaves dataset.scene to the command line .* add dataset.scene=\.\.\."):
        load_config(str(p))
    with pytest.raises(ConfigError, match="leaves dataset.scene"):  # also before interpolations are resolved
        load_config(str(p), resolve=False)


def test_step_counts_written_as_floats_become_ints():
    fixed = whole_step_counts({"max_steps": 2e5, "val_check_interval": 1e5, "log_every_n_steps": 500,
                               "limit_val_batches": 2.0})
    assert fixed == {"max_steps": 200000, "val_check_interval": 100000, "log_every_n_steps": 500,
                     "limit_val_batches": 2.0}
    assert all(type(fixed[k]) is int for k in ("max_steps", "val_check_interval"))
    assert whole_step_counts({"val_check_interval": 0.5, "max_steps": 2.5}) == {"val_check_interval": 0.5,
                                                                                 "max_steps": 2.5}


@pytest.mark.parametrize("option, value, message", [
    ("trainer.max_steps", 2.5, "trainer.max_steps must be a whole number >= 1, not 2.5"),  # Lightning rounds it
    ("trainer.max_steps", -1, "trainer.max_steps must be a whole number >= 1, not -1"),
    ("trainer.val_check_interval", 0, "trainer.val_check_interval must be a whole number >= 1, not 0"),
    ("trainer.val_check_interval", 0.5, "not 0.5"),  # a fraction of the endless epoch would never come
    ("trainer.val_check_interval", 1.0, "1.0 is Lightning's 'once per epoch', which never comes"),
    ("checkpoint.save_top_k", -5, "checkpoint.save_top_k must be a whole number >= -1, not -5"),
    ("checkpoint.every_n_train_steps", "abc", "checkpoint.every_n_train_steps must be a whole number >= 0"),
])
def test_step_counts_lightning_would_refuse_late_are_refused_at_start_up(option, value, message):
    section, key = option.split(".")
    config = OmegaConf.create({"trainer": {"max_steps": 2e5, "val_check_interval": 5000},
                               "checkpoint": {"save_top_k": -1, "every_n_train_steps": "${trainer.max_steps}"}})
    check_trainer_options(config)  # the shipped configs' values (2e5 is a whole number)
    config[section][key] = value
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_trainer_options(config)


def test_plus_adds_a_new_key(path):
    cfg = load_config(path, ["+system.loss.lambda_new=0.5"])
    assert cfg.system.loss.lambda_new == 0.5
    with pytest.raises(ConfigError, match=r"use \+dataset.unheard_of=\.\.\. to add"):
        load_config(path, ["dataset.unheard_of=3"])


def test_an_override_reaches_into_a_list_by_index():
    """neus-demo's decay is the second of its SequentialLR's schedulers. OmegaConf's dotlist, merged whole, reads
    the 1 as a mapping key and stopped with a TypeError traceback; each override is now applied on its own."""
    cfg = load_config("configs/neus-demo.yaml", ["system.scheduler.schedulers.1.args.gamma=0.999",
                                                 "system.scheduler.schedulers.0.args.total_iters=${mul:2,25}"])
    assert cfg.system.scheduler.schedulers[1].args.gamma == 0.999
    assert cfg.system.scheduler.schedulers[0] == {"name": "LinearLR", "args": {
        "start_factor": 0.01, "end_factor": 1.0, "total_iters": 50}}  # the rest of the entry kept
    assert cfg.system.scheduler.milestones == [100]
    with pytest.raises(ConfigError, match=r"^Override '\+system.scheduler.schedulers.2.name=StepLR' cannot be "
                                          r"applied \(list index out of range\): the config has a list of 2 at "
                                          r"system.scheduler.schedulers \(indices 0 to 1\).$"):
        load_config("configs/neus-demo.yaml", ["+system.scheduler.schedulers.2.name=StepLR"])
    with pytest.raises(ConfigError, match=r"^Override 'system.scheduler=\[1,2\]' cannot be applied .*: the config "
                                          r"has a mapping at system.scheduler.$"):
        load_config("configs/neus-demo.yaml", ["system.scheduler=[1,2]"])


def test_missing_file_and_bad_override(path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(path + ".missing")
    with pytest.raises(ConfigError, match=r"^Config file 'configs' is a folder, not a YAML file; the shipped"):
        load_config("configs")  # --config configs: a tab completion stopped one level short
    with pytest.raises(ConfigError, match="key=value"):
        load_config(path, ["trainer.max_steps"])


@pytest.mark.parametrize("typed, meant", [
    ("configs/neus-demo", "configs/neus-demo.yaml"),  # the extension left out
    ("neus-demo.yaml", "configs/neus-demo.yaml"),  # the folder left out
    ("configs/neus_demo.yaml", "configs/neus-demo.yaml"), ("configs/neus-dtu-mask.yaml", "configs/neus-dtu-wmask.yaml"),
    ("configs/xyz.yaml", None),
])
def test_a_config_file_that_is_not_there_names_the_closest_one(typed, meant):
    """A misspelt config file got the shipped configs' folder; now, as a misspelt key does, the closest name."""
    message = rf"^Config file '{re.escape(typed)}' does not exist; " + (
        rf"did you mean --config {re.escape(meant)}\?$" if meant else "the shipped configs are in ")
    with pytest.raises(ConfigError, match=message):
        load_config(typed)


def test_a_trial_folder_or_its_checkpoint_given_as_config_names_the_trials_config_and_vice_versa(tmp_path):
    """--config given the trial folder (as --resume takes one), its config/ or its checkpoint was answered with
    the shipped configs' folder, or "not valid YAML: 'utf-8' codec can't decode byte 0x80"."""
    trial = tmp_path / "exp" / "neus-demo" / "@20261206-101500"
    (trial / "config").mkdir(parents=True)
    (trial / "config" / "parsed.yaml").write_text("name: x\n")
    (trial / "ckpt").mkdir()
    (trial / "ckpt" / "epoch=0-step=5.ckpt").write_bytes(b"PK\x03\x04\x80\x02binary")
    parsed = re.escape(str(trial / "config" / "parsed.yaml"))
    for given in (trial, trial / "config"):
        with pytest.raises(ConfigError, match=rf"^Config file '{re.escape(str(given))}' is a folder, not a YAML file; "
                                              rf"the trial's config is --config {parsed}.$"):
            load_config(str(given))
    with pytest.raises(ConfigError, match=r"is a checkpoint, not a config: give it to --resume, and its trial's "
                                          r"config/parsed.yaml to --config.$"):
        load_config(str(trial / "ckpt" / "epoch=0-step=5.ckpt"))
    # and the other way round: --resume given the config ("cannot be read (UnpicklingError)")
    from utils.resume import CheckpointError, check_resume

    with pytest.raises(CheckpointError, match=r"parsed.yaml' is a config, not a checkpoint: give it to --config, "
                                              r"and a checkpoint of the trial \(its ckpt/<file>.ckpt\) to --resume.$"):
        check_resume(str(trial / "config" / "parsed.yaml"), "test")
    # --test with the trial's config but no --resume: its newest checkpoint is named
    newest = re.escape(str(trial / "ckpt" / "epoch=0-step=5.ckpt"))
    with pytest.raises(CheckpointError, match=rf"^--test needs a checkpoint: add --resume {newest} \(the newest "
                                              r"checkpoint of this config's trial\).$"):
        check_resume(None, "test", str(trial / "config" / "parsed.yaml"))
    with pytest.raises(CheckpointError, match=r"add --resume exp/<name>/<trial>/ckpt/<file>.ckpt.$"):
        check_resume(None, "export", "configs/neus-demo.yaml")
    # a shipped config after training with it: the newest checkpoint of its runs (<exp_dir>/<name>/<trial>/ckpt)
    runs = tmp_path / "exp" / "neus-demo"
    for trial_name, step in (("@20260101-000000", 5), ("tag@20260102-000000", 9)):
        (runs / trial_name / "ckpt").mkdir(parents=True)
        (runs / trial_name / "ckpt" / f"epoch=0-step={step}.ckpt").write_bytes(b"")
        time.sleep(0.05)
    newest = re.escape(str(runs / "tag@20260102-000000" / "ckpt" / "epoch=0-step=9.ckpt"))
    with pytest.raises(CheckpointError, match=rf"^--test needs a checkpoint: add --resume {newest} \(the newest of "
                                              r"this config's runs\).$"):
        check_resume(None, "test", "configs/neus-demo.yaml", str(runs))
    from utils.resume import missing_checkpoint_message  # --resume exp/<name>: a folder of trials

    assert re.search(rf"is a folder; give a checkpoint file, e.g. --resume {newest} \(the newest there\).$",
                     missing_checkpoint_message(str(runs)))


def test_scheduled_scalars():
    assert scheduled(0.3, 10) == 0.3
    assert scheduled([0, 0.0, 1.0, 100], 50) == pytest.approx(0.5)
    assert scheduled([10, 1.0, 3.0, 20], 5) == 1.0 and scheduled([10, 1.0, 3.0, 20], 30) == 3.0
    assert scheduled([1.0, 3.0, 10], 5) == pytest.approx(2.0)
    assert scheduled([3, 1.0, float("nan"), 4], 3) == 1.0, "the end value does not leak into the start (nan * 0)"


def test_script_options_say_the_rule_and_the_text_typed():
    import argparse

    assert argument_at_least(1, int)("1e5") == 100000 and type(argument_at_least(1, int)("7")) is int
    assert argument_at_least(0, float, exclusive=True)("0.25") == 0.25
    for parse, text, rule in ((argument_at_least(1, int), "2.5", "must be a whole number >= 1, not 2.5"),
                              (argument_at_least(0, float, exclusive=True), "0", "must be a number > 0, not 0"),
                              (argument_at_least(0), "abc", "must be a number >= 0, not abc")):
        with pytest.raises(argparse.ArgumentTypeError, match=re.escape(rule)):
            parse(text)


def test_number_at_least_names_the_key_and_the_bound():
    assert number_at_least(3, "a.b", 1) == 3 and number_at_least("3", "a.b", 1) == 3
    assert number_at_least(0.5, "a.r", 0, kind=float, exclusive=True) == 0.5
    for bad in (0, 2.5, "abc", None, True, [1]):
        with pytest.raises(ConfigError, match=r"^a\.b must be a whole number >= 1, not "):
            number_at_least(bad, "a.b", 1)
    with pytest.raises(ConfigError, match=r"a\.r must be a number > 0, not 0"):
        number_at_least(0, "a.r", 0, kind=float, exclusive=True)


def test_a_word_where_the_config_has_a_number_is_named_when_it_breaks_an_interpolation(path):
    """``trainer.max_steps=20k`` used to fail naming only the interpolation that computed with it."""
    with pytest.raises(ConfigError, match=r"Override trainer.max_steps=20k puts a word where the config has a "
                                          r"number \(2000\), and an interpolation computes with it"):
        load_config(path, ["trainer.max_steps=20k"])
    # a word is fine where nothing computes with it (Lightning's precision takes 16 or "16-mixed")
    assert load_config(path, ["system.loss.lambda_rgb=16-mixed"]).system.loss.lambda_rgb == "16-mixed"
    with pytest.raises(ConfigError, match=r"'trainer.max_steps=\[1,2' has a value that is not valid YAML"):
        load_config(path, ["trainer.max_steps=[1,2"])
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path, ["+system.extra=[1"])
