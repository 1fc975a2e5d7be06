"""The settings that change a run's results: fingerprints and differences between configs."""

from fedlora.config import NEUTRAL_KEYS, RESUMABLE_KEYS, fingerprint, flat_settings, load_config, settings_diff


def test_neutral_keys_do_not_change_the_fingerprint_and_result_keys_do():
    base = load_config()
    moved = load_config(None, ["run.name=x", "run.output_dir=elsewhere", "run.progress=false", "model.threads=3"])
    assert fingerprint(base) == fingerprint(moved) and settings_diff(base, moved) == []
    for override, named in [("train.lr=1e-3", "train.lr"), ("lora.r=8", "lora.r"), ("run.seed=1", "run.seed"),
                             ("strategy.options.weighting=uniform", "strategy.options.weighting"),
                             ('data.columns={text="t"}', "data.columns.text")]:  # tables name their inner key
        other = load_config(None, [override])
        assert fingerprint(other) != fingerprint(base), override
        assert [k for k, _, _ in settings_diff(base, other)] == [named]


def test_every_setting_is_a_result_key_unless_named_neutral():
    # a key added to the config later counts for results unless someone decides otherwise
    keys = set(flat_settings(load_config()))
    assert NEUTRAL_KEYS <= keys and RESUMABLE_KEYS <= keys


def test_an_integer_and_the_equal_float_are_the_same_setting():
    a = load_config(None, ["train.lr=1"])
    b = load_config(None, ["train.lr=1.0"])
    assert fingerprint(a) == fingerprint(b)


def test_resumable_keys_are_ignored_when_asked():
    a = load_config()
    b = load_config(None, ["train.rounds=50", "eval.every=5", "train.lr=1e-3"])
    assert [k for k, _, _ in settings_diff(a, b, ignore=RESUMABLE_KEYS)] == ["train.lr"]
