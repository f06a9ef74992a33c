"""Command lines of the experiments: early one-line errors for bad settings, --help speed,
run fingerprints (refuse / resume / nothing to do / --overwrite), documented commands.

The bad-settings table runs each experiment's declarative rules (`experiments.common.validate`
with the module's ``RULES``) in one helper process per experiment (tests/rules_probe.py);
a few cases go through the real command line to check exit code 2, one stderr line, no
traceback, and that nothing was created or computed.
"""

import json
import os
import re
import shlex
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAN = float("nan")

# (experiment, {flag: bad value}, substring the one-line message must contain)
BAD = {
    "universality": [
        ({"metrics": ["bogus"]}, "--metrics: unknown 'bogus'"),
        ({"metrics": ["svcca", "nope"]}, "'nope'"),
        ({"metrics": []}, "--metrics: expected at least one"),
        ({"threshold": 2.0}, "--threshold"),
        ({"threshold": 1.0001}, "--threshold"),
        ({"threshold": NAN}, "--threshold"),
        ({"max_bad_fraction": -0.1}, "--max_bad_fraction"),
        ({"max_bad_fraction": 1.5}, "--max_bad_fraction"),
        ({"num_permutations": 0}, "--num_permutations"),
        ({"num_permutations": -3}, "--num_permutations"),
        ({"top_n": 0}, "--top_n"),
        ({"chunk_size": 0}, "--chunk_size"),
        ({"chunk_size": -1}, "--chunk_size"),
        ({"toy_n_tokens": 0}, "--toy_n_tokens"),
        ({"toy_n_tokens": 100}, "--toy_n_tokens=100"),
        ({"toy_n_features": 0}, "--toy_n_features"),
        ({"toy_n_features": 2}, "--toy_n_features=2"),
        ({"toy_d": 0}, "--toy_d"),
        ({"toy_steps": 0}, "--toy_steps"),
        ({"toy_steps": -5}, "--toy_steps"),
        ({"context_length": 0}, "--context_length"),
        ({"max_contexts": 0}, "--max_contexts"),
        ({"lm_batch_size": 0}, "--lm_batch_size"),
        ({"sae_expansion": 0}, "--sae_expansion"),
        ({"sae_k": 0}, "--sae_k"),
        ({"sae_steps": -1}, "--sae_steps"),
        ({"sae_batch_size": 0}, "--sae_batch_size"),
        ({"min_pairs": 2}, "--min_pairs"),
        ({"min_pairs": 0}, "--min_pairs"),
        ({"seed": -1}, "--seed"),
        ({"toy_perturbation": -0.5}, "--toy_perturbation"),
        ({"cache_a": "{dir}"}, "--cache_a and --cache_b must be given together"),
        ({"cache_a": "/nonexistent/c", "cache_b": "/nonexistent/c"}, "--cache_a=/nonexistent"),
        ({"model_a": "/nonexistent/model"}, "--model_a=/nonexistent/model: no such directory"),
        ({"model_b": "{file}"}, "not a directory"),
        ({"saes_a": "/nonexistent/saes"}, "--saes_a=/nonexistent/saes"),
        ({"text": "/nonexistent/text.txt"}, "--text=/nonexistent/text.txt"),
        ({"text": ["sample", "{empty}"]}, "is an empty file"),
        ({"text": ["{dir}"]}, "holds no .txt/.jsonl files"),
        ({"hookpoints_a": ["foo.1"]}, "--hookpoints_a: hookpoint 'foo.1'"),
        ({"hookpoints_a": ["resid_post.x"]}, "--hookpoints_a"),
        ({"hookpoints_b": ["blocks.x.hook_resid_post"]}, "--hookpoints_b"),
        ({"mesh_data": 0}, "--mesh_data"),
        ({"mesh_data": -2}, "--mesh_data"),
        ({"mesh_feature": 0}, "--mesh_feature"),
        ({"num_cpu_devices": -1}, "--num_cpu_devices"),
        ({"workdir": "{file}"}, "is a file, expected a directory"),
        ({"workdir": "{file}/sub"}, "is a file, expected a directory"),
    ],
    "semantic_subspaces": [
        ({"metrics": ["bogus"]}, "--metrics: unknown 'bogus'"),
        ({"concepts": ["Bogus"]}, "unknown concept group 'Bogus'"),
        ({"topic": "Nope"}, "--topic 'Nope'"),
        ({"concepts_file": "/nonexistent/c.json"}, "--concepts_file=/nonexistent/c.json"),
        ({"concepts_file": "{empty}"}, "no group found"),
        ({"num_permutations": 0}, "--num_permutations"),
        ({"min_pairs": 2}, "--min_pairs"),
        ({"threshold": 1.5}, "--threshold"),
        ({"alpha": 0.0}, "--alpha"),
        ({"alpha": 1.0}, "--alpha"),
        ({"sae_lr": 0.0}, "--sae_lr"),
        ({"sae_k": 9, "sae_width": 8}, "--sae_k=9: expected <= --sae_width=8"),
        ({"model_a": "{dir}"}, "give both --model_a and --model_b"),
        ({"model_a": "/nonexistent", "model_b": "/nonexistent"}, "--model_a=/nonexistent"),
        ({"hookpoint_a": "bad"}, "--hookpoint_a"),
        ({"hookpoint_b": "mlp_in.1"}, "--hookpoint_b"),
        ({"text": "/nonexistent.jsonl"}, "--text=/nonexistent.jsonl"),
        ({"context_length": 1}, "--context_length"),
        ({"member_top_n": 0}, "--member_top_n"),
        ({"random_draws": 0}, "--random_draws"),
        ({"knn_k": 0}, "--knn_k"),
        ({"sae_width": -1}, "--sae_width"),
        ({"max_contexts": -1}, "--max_contexts"),
        ({"max_documents": -1}, "--max_documents"),
        ({"sae_steps": 0}, "--sae_steps"),
        ({"sae_batch": 0}, "--sae_batch"),
        ({"toy_d": 0}, "--toy_d"),
        ({"toy_n_tokens": 0}, "--toy_n_tokens"),
        ({"toy_group_size": 0}, "--toy_group_size"),
        ({"lm_train_steps": -1}, "--lm_train_steps"),
        ({"chunk_size": 0}, "--chunk_size"),
        ({"seed": -2}, "--seed"),
        ({"workdir": "{file}"}, "is a file"),
    ],
    "harvest": [
        ({"hookpoints": ["bad"]}, "--hookpoints: hookpoint 'bad'"),
        ({"hookpoints": []}, "--hookpoints: expected at least one"),
        ({"context_length": 1}, "--context_length"),
        ({"batch_size": 0}, "--batch_size"),
        ({"max_tokens": -1}, "--max_tokens"),
        ({"shard_contexts": -1}, "--shard_contexts"),
        ({"seed": -1}, "--seed"),
        ({"model": "tiny:foo"}, "--model=tiny:foo"),
        ({"model": "/nonexistent/model"}, "--model=/nonexistent/model"),
        ({"text": ["/nonexistent.txt"]}, "--text=/nonexistent.txt"),
        ({"text": []}, "--text: expected at least one"),
        ({"cache_dir": "{file}"}, "--cache_dir="),
        ({"workdir": "{file}"}, "is a file"),
    ],
    "train_sae": [
        ({"activation": ["relu6"]}, "--activation: unknown 'relu6'"),
        ({"activation": []}, "--activation: expected at least one"),
        ({"source": "npy"}, "--npy_path is required"),
        ({"source": "npy", "npy_path": "/nonexistent.npy"}, "--npy_path=/nonexistent.npy"),
        ({"source": "npy", "npy_path": "{npy1d}"}, "expected a 2-D array"),
        ({"source": "npy", "npy_path": "{npy2d}", "k": ["9"]}, "--k=9: expected <="),
        ({"source": "npy", "npy_path": "{garbage_npy}"}, "not a .npy file"),
        ({"source": "npy", "npy_path": "{pickle_npy}"}, "pickled"),
        ({"source": "cache"}, "--cache_path is required"),
        ({"source": "cache", "cache_path": "{file}"}, "not a directory"),
        ({"source": "lm", "model_path": "{dir}"}, "--hookpoint are required"),
        ({"epochs": -1.0}, "--epochs"),
        ({"shuffle_buffer": 0}, "--shuffle_buffer"),
        ({"eval_frac": 1.0}, "--eval_frac"),
        ({"eval_frac": -0.1}, "--eval_frac"),
        ({"n_true": 0}, "--n_true"),
        ({"d": 0}, "--d:"),
        ({"k_true": 0.0}, "--k_true"),
        ({"k_true": 600.0}, "--k_true=600.0: expected <= --n_true=512"),
        ({"correlation": 1.0}, "--correlation"),
        ({"n_blocks": 0}, "--n_blocks"),
        ({"d_sae": ["abc"]}, "--d_sae: expected an integer"),
        ({"d_sae": ["0"]}, "--d_sae"),
        ({"d_sae": ["-4"]}, "--d_sae"),
        ({"d_sae": ["1.5"]}, "--d_sae"),
        ({"d_sae_mult": ["0"]}, "--d_sae_mult"),
        ({"d_sae_mult": ["x"]}, "--d_sae_mult"),
        ({"d_sae_mult": ["0.0001"]}, "SAE width 0: expected >= 1"),
        ({"d_sae_mult": ["0.001"]}, "--k=5: expected <= the smallest SAE width (d_sae 1)"),
        ({"k": ["0"]}, "--k:"),
        ({"k": ["600"]}, "--k=600: expected <= the smallest"),
        ({"k": ["3.5"]}, "--k:"),
        ({"d_sae": ["4"], "k": ["5"]}, "--k=5"),
        ({"l1_coeff": ["-1"]}, "--l1_coeff"),
        ({"l0_coeff": ["-0.1"]}, "--l0_coeff"),
        ({"seeds": ["-1"]}, "--seeds"),
        ({"seeds": ["a"]}, "--seeds"),
        ({"steps": 0}, "--steps"),
        ({"batch_size": 0}, "--batch_size"),
        ({"lr": 0.0}, "--lr"),
        ({"lr": -1.0}, "--lr"),
        ({"lr_decay_frac": 1.5}, "--lr_decay_frac"),
        ({"dead_tokens": 0}, "--dead_tokens"),
        ({"k_aux": -2}, "--k_aux"),
        ({"eval_rows": 0}, "--eval_rows"),
        ({"match_threshold": 1.5}, "--match_threshold"),
        ({"log_every": 0}, "--log_every"),
        ({"checkpoint_every": 0}, "--checkpoint_every"),
        ({"data_seed": -1}, "--data_seed"),
        ({"dict_seed": -1}, "--dict_seed"),
    ],
    "toy_superposition": [
        ({"sweep_steps": 0}, "--sweep_steps"),
        ({"sweep_batch_size": 0}, "--sweep_batch_size"),
        ({"sweep_lr": 0.0}, "--sweep_lr"),
        ({"sweep_seeds": 0}, "--sweep_seeds"),
        ({"pentagon_seeds": 0}, "--pentagon_seeds"),
        ({"sweep_log_every": 0}, "--sweep_log"),
        ({"sweep_checkpoint_every": 0}, "--sweep_checkpoint_every"),
        ({"pentagon_sparsity": ["1.0"]}, "--pentagon_sparsity"),
        ({"pentagon_sparsity": ["-0.1"]}, "--pentagon_sparsity"),
        ({"pentagon_sparsity": ["x"]}, "--pentagon_sparsity"),
        ({"dim_features": 0}, "--dim_features"),
        ({"dim_hidden": 0}, "--dim_hidden"),
        ({"dim_hidden": 200}, "--dim_hidden=200: expected < --dim_features=100"),
        ({"dim_points": 1}, "--dim_points"),
        ({"dim_seeds": 0}, "--dim_seeds"),
        ({"dim_max_inverse_density": 1.0}, "--dim_max_inverse_density"),
        ({"phase_points": 0}, "--phase_points"),
        ({"sweeps": "zzz"}, "--sweeps: unknown 'zzz'"),
        ({"sweeps": "pentagon,phaze"}, "'phaze'"),
        ({"sweeps": ""}, "--sweeps: expected"),
    ],
    "feature_geometry": [
        ({"variants": ["x"]}, "--variants: unknown 'x'"),
        ({"variants": []}, "--variants: expected at least one"),
        ({"concept": "weeks"}, "--concept: unknown 'weeks'"),
        ({"width": 0}, "--width"),
        ({"n_tokens": 0}, "--n_tokens"),
        ({"n_groups": -1}, "--n_groups"),
        ({"group_size": 0}, "--group_size"),
        ({"n_other": -1}, "--n_other"),
        ({"noise": -1.0}, "--noise"),
        ({"circle_offset": 1.0}, "--circle_offset"),
        ({"circle_offset": -0.1}, "--circle_offset"),
        ({"circle_unique": 1.0}, "--circle_unique"),
        ({"concept_magnitude": 0.0}, "--concept_magnitude"),
        ({"concept_magnitude": 1.5}, "--concept_magnitude"),
        ({"sae_activation": "gelu"}, "--sae_activation: unknown 'gelu'"),
        ({"sae_l1_coeff": -1.0}, "--sae_l1_coeff"),
        ({"sae_width": -1}, "--sae_width"),
        ({"sae_k": 0}, "--sae_k"),
        ({"sae_k": 9, "sae_width": 8}, "--sae_k=9"),
        ({"sae_steps": 0}, "--sae_steps"),
        ({"sae_batch": 0}, "--sae_batch"),
        ({"sae_lr": 0.0}, "--sae_lr"),
        ({"sae_dead_tokens": 0}, "--sae_dead_tokens"),
        ({"graph_k": 0}, "--graph_k"),
        ({"graph_threshold": 2.0}, "--graph_threshold"),
        ({"min_size": 0}, "--min_size"),
        ({"max_size": -1}, "--max_size"),
        ({"max_size": 1, "min_size": 2}, "--max_size=1"),
        ({"spectral_clusters": -1}, "--spectral_clusters"),
        ({"family_recall": 0.0}, "--family_recall"),
        ({"family_recall": 1.5}, "--family_rec"),
        ({"n_null": 0}, "--n_null"),
        ({"alpha": 0.0}, "--alpha"),
        ({"chunk_size": 0}, "--chunk"),
        ({"min_token_count": 0}, "--min_token_count"),
        ({"plot_tokens": -1}, "--plot_tokens"),
        ({"seed": -1}, "--seed"),
        # --preset=lm settings (checked whatever the preset, before any model is loaded).
        ({"family_tau": 0.0}, "--family_tau"),
        ({"family_tau": 1.5}, "--family_tau"),
        ({"family_min_hits": 0}, "--family_min_hits"),
        ({"context_length": 2}, "--context"),
        ({"families": ["Nope"]}, "'Nope'"),
        ({"group_concepts": ["Food", "Arabic script", "Klingon script"]}, "'Klingon script'"),
        ({"families": []}, "--families"),
        ({"group_concepts": ["Food", "Numbers"]}, "--group_concepts"),
        ({"topic": "Nope"}, "'Nope'"),
        ({"model_a": "{file}"}, "--model_a"),
        ({"text": "/nonexistent/corpus.jsonl"}, "--text"),
        ({"hookpoint_a": "foo"}, "foo"),
        ({"spectral_max_features": 0}, "--spectral_max_features"),
    ],
    "demo": [
        ({"num_steps": 0}, "--num_steps"),
        ({"batch_size": 0}, "--batch_size"),
        ({"d": 0}, "--d:"),
        ({"latent": 0}, "--latent"),
        ({"latent": 99}, "--latent=99: expected <= --d=16"),
        ({"n_rows": 0}, "--n_rows"),
        ({"lr": 0.0}, "--lr"),
        ({"log_every": 0}, "--log_every"),
        ({"checkpoint_every": 0}, "--checkpoint_every"),
        ({"seed": -1}, "--seed"),
        ({"batch_size": 9000}, "--batch_size=9000: expected <= --n_rows=8192"),
    ],
}


def _json_probe(script_args: list[str], payload, *, timeout: int):
    """Runs ``tests/<script> ARGS`` with ``payload`` as JSON on stdin; its stdout as JSON."""
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tests", script_args[0]), *script_args[1:]],
        input=json.dumps(payload),
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout,
        env=_env(),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("files")
    (d / "a_file").write_text("not a directory\n")
    (d / "empty.txt").write_text("\n")
    np.save(d / "one_d.npy", np.zeros(5, np.float32))
    np.save(d / "two_d.npy", np.zeros((10, 4), np.float32))
    (d / "garbage.npy").write_bytes(b"garbage, not an array")
    np.save(d / "pickle.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (d / "dir").mkdir()
    return {
        "file": str(d / "a_file"),
        "empty": str(d / "empty.txt"),
        "dir": str(d / "dir"),
        "npy1d": str(d / "one_d.npy"),
        "npy2d": str(d / "two_d.npy"),
        "garbage_npy": str(d / "garbage.npy"),
        "pickle_npy": str(d / "pickle.npy"),
    }


def _fill(value, files):
    if isinstance(value, str):
        return value.format(**files)
    if isinstance(value, list):
        return [_fill(v, files) for v in value]
    return value


@pytest.fixture(scope="module")
def probed(files):
    """Per experiment: the messages for its defaults (first) and every bad case."""
    out = {}
    for name, cases in BAD.items():
        payload = [{"set": {}}]
        for settings, _ in cases:
            s = {k: _fill(v, files) for k, v in settings.items()}
            payload.append(
                {
                    "set": {k: v for k, v in s.items() if k != "workdir"},
                    **({"workdir": s["workdir"]} if "workdir" in s else {}),
                }
            )
        out[name] = _json_probe(["rules_probe.py", f"experiments.{name}"], payload, timeout=300)
    return out


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("XLA_FLAGS", None)
    return env


CASES = [
    (name, i, settings, expected)
    for name, cases in BAD.items()
    for i, (settings, expected) in enumerate(cases)
]


def test_defaults_pass_every_rule(probed):
    for name, results in probed.items():
        assert results[0]["message"] is None, (name, results[0]["message"])


@pytest.mark.parametrize(
    "name,index,settings,expected", CASES, ids=[f"{c[0]}-{'-'.join(c[2])}-{c[1]}" for c in CASES]
)
def test_bad_setting_is_one_line_naming_it(probed, name, index, settings, expected):
    result = probed[name][index + 1]
    message = result["message"]
    assert message is not None, f"{name} accepted {settings}"
    assert "\n" not in message
    assert expected in message, message
    assert result["seconds"] < 5.0


def cli(module, *args, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", f"experiments.{module}", *args],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_one_line_exit_2(proc, name):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"{name}: "), proc.stderr
    return lines[0]


@pytest.mark.parametrize(
    "args,expected",
    [
        (("--metrics=bogus",), "--metrics: unknown 'bogus'"),
        (("--threshold=2.0",), "--threshold"),
        (("--toy_d=abc",), "toy_d"),
        (("--no_such_flag=1",), "no_such_flag"),
        (("positional",), "positional"),
    ],
)
def test_universality_cli_rejects_before_any_work(tmp_path, args, expected):
    t0 = time.perf_counter()
    proc = cli("universality", f"--workdir={tmp_path / 'run'}", *args)
    line = assert_one_line_exit_2(proc, "universality")
    assert expected in line
    assert not (tmp_path / "run").exists()  # nothing created, nothing computed
    assert time.perf_counter() - t0 < 60  # generous: CI machines are shared


def test_workdir_that_is_a_file_is_one_line(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    for module in ("universality", "demo"):
        line = assert_one_line_exit_2(cli(module, f"--workdir={f}"), module)
        assert "is a file" in line


def test_help_lists_documented_flags_fast_and_without_jax():
    t0 = time.perf_counter()
    proc = cli("universality", "--help")
    seconds = time.perf_counter() - t0
    assert proc.returncode in (0, 1) and "Try --helpfull" in proc.stdout  # absl exits 1
    options = proc.stdout[proc.stdout.index("flags:") :]
    flags = documented_flags("universality") | {
        "workdir",
        "overwrite",
        "dry_run",
        "model_a",
        "saes_a",
        "cache_a",
        "config",
    }
    for flag in flags:
        assert re.search(rf"^  --(\[no\])?{flag}:", options, re.M), flag
    assert seconds < 3.0, seconds
    # The flag modules import no JAX / torch / transformers (what made --help slow).
    code = (
        "import sys; sys.argv=['x']; import experiments.universality; "
        "print(sorted(m for m in ('jax', 'torch', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


# -- documented commands -----------------------------------------------------------------------


def documented_commands(with_docstrings: bool = False) -> list[tuple[str, list[str]]]:
    """Every ``python -m experiments.X ...`` command in README.md and WORKSPACE.md (and the
    experiments' module docstrings), as (module, args)."""
    import ast

    out = []
    texts = []
    for doc in ("README.md", "WORKSPACE.md"):
        with open(os.path.join(ROOT, doc), encoding="utf-8") as f:
            texts.append(f.read())
    if with_docstrings:
        for name in ENTRY_POINTS:
            with open(os.path.join(ROOT, "experiments", f"{name}.py"), encoding="utf-8") as f:
                texts.append(ast.get_docstring(ast.parse(f.read())))
        # get_config()'s docstring of every config file holds the command that runs it.
        configs = os.path.join(ROOT, "experiments", "configs")
        for name in sorted(os.listdir(configs)):
            if name.endswith(".py") and name != "__init__.py":
                with open(os.path.join(configs, name), encoding="utf-8") as f:
                    tree = ast.parse(f.read())
                texts += [
                    ast.get_docstring(n) or ""
                    for n in tree.body
                    if isinstance(n, ast.FunctionDef) and n.name == "get_config"
                ]
    for text in texts:
        text = re.sub(r"\\\s*\n\s*", " ", text)
        for m in re.finditer(r"python -m experiments\.(\w+)([^`\n|&]*)", text):
            if m.group(1).startswith("bench"):
                continue
            args = [a.strip("[]") for a in shlex.split(m.group(2))]  # [optional flags]
            out.append((m.group(1), args))
    return out


ENTRY_POINTS = (
    "universality",
    "train_sae",
    "toy_superposition",
    "harvest",
    "feature_geometry",
    "semantic_subspaces",
    "demo",
    "tokenizers_toy",
    "importance",
    "joint_sae",
)


def documented_flags(module: str) -> set[str]:
    flags = set()
    for mod, args in documented_commands():
        if mod == module:
            flags |= {a[2:].split("=")[0] for a in args if a.startswith("--")}
    return flags


@pytest.mark.slow  # ~45 s on 2 shared cores (was ~200 s with one fresh Python per command)
def test_documented_commands_parse_and_validate(tmp_path):
    """Each documented command passes flag parsing and the settings checks (`--dry_run`);
    placeholders (DIR_A, SAES_A, corpus.jsonl, weights) may only fail as missing paths.

    The commands run as ``python -m experiments.X ARGS --dry_run`` would, each in a forked
    child of one helper process that imported JAX once (tests/dry_run_probe.py)."""
    cmds = documented_commands(with_docstrings=True)
    assert len(cmds) >= 20
    runs = [
        (
            module,
            [f"--workdir={tmp_path / str(i)}" if a.startswith("--workdir=") else a for a in args]
            + ["--dry_run"],
        )
        for i, (module, args) in enumerate(cmds)
    ]
    results = _json_probe(["dry_run_probe.py"], runs, timeout=600)
    assert len(results) == len(runs)
    for (module, args), result in zip(runs, results, strict=True):
        done = subprocess.CompletedProcess(
            [module, *args], result["returncode"], result["stdout"], result["stderr"]
        )
        if done.returncode == 0:
            assert done.stdout.strip().startswith("dry run: settings OK"), (module, args, done)
            continue
        line = assert_one_line_exit_2(done, module)
        assert re.search(r"no such (local model |file or )?(file|director)", line), (
            module,
            args,
            line,
        )


def test_train_sae_documented_row_runs(tmp_path):
    """The WORKSPACE row ``train_sae --source=synthetic`` (no width flag) runs; tiny sizes."""
    proc = cli(
        "train_sae",
        f"--workdir={tmp_path}",
        "--source=synthetic",
        "--n_true=16",
        "--d=8",
        "--k_true=2",
        "--k=2",
        "--steps=20",
        "--batch_size=64",
        "--eval_rows=256",
        "--dead_tokens=1000",
        "--noprogress",
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / "results.json") as f:
        saes = json.load(f)["saes"]
    assert [s["d_sae"] for s in saes] == [16]  # default width: 1 x n_true
