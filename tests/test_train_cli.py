"""``fastadv train`` argument resolution: which settings reach the method (no training here)."""
import argparse

import pytest

from fastadv.train import cli


def _method(argv):
    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    args = p.parse_args(argv)
    return cli.build_method(args, cli.DATASET_DEFAULTS[args.dataset], None)


def test_cifar10_methods_keep_their_papers_attack():
    # TRADES' CIFAR-10 attack is 10 steps of 0.007 (yaodongyu/TRADES); the dataset's 2/255 x 7 is PGD-AT's
    t = _method(["--dataset", "cifar10", "--method", "trades"])
    assert (t.alpha, t.steps) == (0.007, 10)
    f = _method(["--dataset", "cifar10", "--method", "fat"])
    assert (f.alpha, f.steps) == (0.007, 10)
    p = _method(["--dataset", "cifar10", "--method", "pgd"])
    assert (p.alpha, p.steps) == (2 / 255, 7)
    # an explicit flag always wins
    t = _method(["--dataset", "cifar10", "--method", "trades", "--alpha", "0.01", "--steps", "3"])
    assert (t.alpha, t.steps) == (0.01, 3)


def test_mnist_passes_the_dataset_attack():
    t = _method(["--method", "trades"])
    d = cli.DATASET_DEFAULTS["embedded-mnist"]
    assert (t.eps, t.alpha, t.steps) == (d["eps"], d["alpha"], d["steps"])


def test_method_arg_reaches_the_constructor_and_unknown_names_are_named():
    t = _method(["--method", "trades", "--method-arg", "beta=2.5", "--method-arg", "attack_mode='train'"])
    assert t.beta == 2.5 and t.attack_mode == "train"
    with pytest.raises(SystemExit, match="TRADES takes .*beta"):
        _method(["--method", "trades", "--method-arg", "gamma=1"])
    with pytest.raises(SystemExit, match="NAME=VALUE"):
        _method(["--method", "trades", "--method-arg", "beta"])


def test_awp_passes_only_its_base_methods_settings():
    a = _method(["--method", "awp", "--method-arg", "base='trades'"])
    assert a.base.name == "trades" and a.base.beta == 1.0  # MNIST's beta reaches TRADES
    a = _method(["--method", "awp"])
    assert a.base.name == "pgd" and a.base.eps_warmup == cli.DATASET_DEFAULTS["mnist"]["eps_warmup"]
    a = _method(["--dataset", "cifar10", "--method", "awp"])
    assert a.base.steps == 10  # AT-AWP's PGD-10, not the dataset's PGD-7
    with pytest.raises(SystemExit, match="base must be one of"):
        _method(["--method", "awp", "--method-arg", "base='nope'"])


def test_cost_sensitive_keeps_its_one_step_attack_on_mnist():
    c = _method(["--method", "cost", "--method-arg", "protected=[3]"])
    assert c.steps == 1


def test_mnist_presets_of_dial_and_afd_fill_unset_terms():
    m = _method(["--method", "dial"])
    assert (m.variant, m.beta, m.domain_weight) == ("ce", 6.0, 0.1)
    m = _method(["--method", "dial", "--beta", "2", "--method-arg", "variant='kl'"])
    assert (m.variant, m.beta) == ("kl", 2.0)
    a = _method(["--method", "afd"])
    assert a.critic_lr == 0.5 and a.eps == 0.3


def _model_kwargs(argv, model="mnist_cnn"):
    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    args = p.parse_args(argv)
    return cli.model_kwargs(args, cli.DATASET_DEFAULTS[args.dataset], model, (1, 28, 28))


def test_afd_gets_the_reference_encoders_unit_norm_features_and_others_do_not():
    assert _model_kwargs(["--method", "afd"]) == {"width": 0.5, "feature_norm": True}
    assert _model_kwargs(["--method", "afd", "--no-feature-norm"]) == {"width": 0.5}
    assert _model_kwargs(["--method", "pgd"]) == {"width": 0.5}
    assert _model_kwargs(["--method", "pgd", "--feature-norm"])["feature_norm"] is True
    assert "feature_norm" not in _model_kwargs(["--method", "afd"], model="preact_resnet18")
    with pytest.raises(SystemExit, match="--feature-norm: only mnist_cnn"):
        _model_kwargs(["--method", "afd", "--feature-norm"], model="preact_resnet18")


@pytest.mark.parametrize("name,kw", [("metric", {}), ("iat", {"mixup": "manifold", "mix_layers": ("input", "2")})])
def test_hook_methods_refuse_a_compiled_model(name, kw):
    # a forward hook added per call never fires under torch.compile: refuse instead of silently training
    # another method (no compile happens: torch.compile only wraps until the first call)
    import torch

    from fastadv.models import get_model
    from fastadv.train.methods import BindContext, get_method

    net = get_model("mnist_cnn", 10, width=0.125)
    m = get_method(name, **kw)
    if name == "metric":
        m.set_invariance_bank((torch.rand(8, 1, 28, 28), torch.arange(8) % 10))
    with pytest.raises(ValueError, match="torch.compile"):
        m.bind(BindContext(net=net, model=torch.compile(net), attack_net=net, device=torch.device("cpu")))


def test_small_cnn_takes_no_width():
    assert _model_kwargs(["--method", "trades"], model="small_cnn") == {}
    with pytest.raises(SystemExit, match="--width: TRADES' SmallCNN has one size"):
        _model_kwargs(["--method", "trades", "--width", "0.5"], model="small_cnn")


def test_cli_flag_reaches_every_method_and_only_pgd_ramps_by_default():
    assert _method(["--method", "mart", "--eps-warmup", "0.3"]).eps_warmup == 0.3
    assert "eps_warmup" not in vars(_method(["--method", "mart"]))  # the MNIST default is pgd's alone
    assert _method(["--method", "pgd"]).eps_warmup == cli.DATASET_DEFAULTS["mnist"]["eps_warmup"]
    a = _method(["--method", "awp", "--method-arg", "base='trades'", "--eps-warmup", "0.2"])
    assert a.base.eps_warmup == 0.2  # AWP's base runs the attack
    with pytest.raises(SystemExit, match="--eps-warmup: .*'trs' has no eps"):
        _method(["--method", "trs", "--eps-warmup", "0.3"])
