"""The provider as Airflow sees it: provider.yaml, the entry point, and what registering costs."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from importlib import resources
from importlib.metadata import entry_points

import pytest
import yaml

from airloop.get_provider_info import get_provider_info

INFO = yaml.safe_load(resources.files("airloop").joinpath("provider.yaml").read_text())
MODULES = [
    m for kind in ("hooks", "operators", "triggers") for group in INFO[kind] for m in group["python-modules"]
]


def test_get_provider_info_returns_provider_yaml():
    info = get_provider_info()
    assert {k: v for k, v in info.items() if k != "versions"} == INFO
    assert info["package-name"] == "airflow-provider-airloop"
    assert info["versions"] == [importlib.import_module("airloop").__version__]


def test_entry_point_points_at_get_provider_info():
    (ep,) = [ep for ep in entry_points(group="apache_airflow_provider") if ep.value.startswith("airloop.")]
    assert ep.load() is get_provider_info


@pytest.mark.parametrize("module", MODULES)
def test_listed_module_imports(module):
    importlib.import_module(module)


def test_connection_types_are_ours_and_hooks_declare_them():
    types = {c["connection-type"]: c["hook-class-name"] for c in INFO["connection-types"]}
    assert not {"http", "generic", "aws", "kubernetes"} & set(types)  # never re-register a shared type
    for conn_type, path in types.items():
        module, _, name = path.rpartition(".")
        hook = getattr(importlib.import_module(module), name)
        assert hook.conn_type == conn_type
        assert hook.conn_name_attr.endswith("_conn_id") and hook.default_conn_name.endswith("_default")
        assert name.endswith("Hook")


def test_extra_links_resolve():
    for path in INFO["extra-links"]:
        module, _, name = path.rpartition(".")
        link = getattr(importlib.import_module(module), name)()
        assert name.endswith("Link") and link.name


def test_plugin_is_registered_by_provider_yaml_and_the_entry_point():
    from airflow.plugins_manager import AirflowPlugin
    from airflow.providers_manager import ProvidersManager

    (entry,) = INFO["plugins"]
    module, _, name = entry["plugin-class"].rpartition(".")
    plugin = getattr(importlib.import_module(module), name)
    assert issubclass(plugin, AirflowPlugin) and plugin.name == entry["name"]
    # Airflow loads entry-point plugins by default, provider.yaml's only with lazy discovery off.
    (ep,) = [ep for ep in entry_points(group="airflow.plugins") if ep.value.startswith("airloop.")]
    assert ep.load() is plugin
    listed = {(p.name, p.plugin_class, p.provider_name) for p in ProvidersManager().plugins}
    assert (entry["name"], entry["plugin-class"], "airflow-provider-airloop") in listed


def test_class_names_follow_airflow_conventions():
    suffix = {"operators": "Operator", "hooks": "Hook", "triggers": "Trigger"}
    for kind, end in suffix.items():
        for group in INFO[kind]:
            for module in group["python-modules"]:
                mod = importlib.import_module(module)
                public = [
                    n
                    for n, v in vars(mod).items()
                    if isinstance(v, type) and v.__module__ == module and not n.startswith("_")
                ]
                assert public, module
                assert all(n.endswith(end) for n in public if end in n or kind != "operators"), (
                    module,
                    public,
                )


def test_airflow_lists_the_provider_and_its_connection_types(tmp_path):
    env = {**__import__("os").environ, "AIRFLOW_HOME": str(tmp_path)}
    airflow = str(__import__("pathlib").Path(sys.executable).parent / "airflow")
    providers = subprocess.run(
        [airflow, "providers", "list", "-o", "json"], env=env, capture_output=True, text=True, check=True
    )
    assert "airflow-provider-airloop" in {p["package_name"] for p in json.loads(providers.stdout)}
    hooks = subprocess.run(
        [airflow, "providers", "hooks", "-o", "json"], env=env, capture_output=True, text=True, check=True
    )
    listed = {h["connection_type"] for h in json.loads(hooks.stdout)}
    assert {"mlflow", "airloop_serving", "feast"} <= listed


HEAVY = ("mlflow", "great_expectations", "openvino", "sklearn", "feast", "onnx", "alibi_detect", "torch")


def test_operator_hook_trigger_and_dag_modules_import_no_heavy_library():
    code = (
        "import sys, importlib\n"
        f"for m in {MODULES!r}: importlib.import_module(m)\n"
        "import runpy; [runpy.run_path(p) for p in sys.argv[1:]]\n"
        f"print([m for m in {HEAVY!r} if m in sys.modules])"
    )
    dags = [
        str(p) for p in (importlib.import_module("pathlib").Path(__file__).parents[2] / "dags").glob("*.py")
    ]
    out = subprocess.run([sys.executable, "-c", code, *dags], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"
