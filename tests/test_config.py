"""config.toml validation: every error names its key; the shipped file is the generated one."""

from pathlib import Path

import pytest

from dicomnode.config import (
    ConfigError,
    Settings,
    load_settings,
    render_config_toml,
    settings_from_mapping,
)

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_config_is_the_generated_default() -> None:
    assert (ROOT / "config.toml").read_text() == render_config_toml()
    settings = load_settings(ROOT / "config.toml")
    defaults = Settings(base_dir=ROOT)
    assert settings.node == defaults.node
    assert settings.series == defaults.series
    assert settings.destinations == ()
    assert settings.database_url == f"sqlite:///{ROOT / 'dicomnode-data' / 'index.sqlite'}"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"node": {"prot": 104}}, "node.prot: unknown key"),
        ({"nodes": {}}, "[nodes]: unknown section"),
        ({"node": {"port": "104"}}, "node.port = '104': expected integer"),
        ({"node": {"port": 70000}}, "node.port = 70000"),
        ({"node": {"ae_title": "A" * 17}}, "node.ae_title"),
        ({"node": {"ae_title": "BAD\\AE"}}, "node.ae_title"),
        ({"node": {"allowed_calling_aets": "PACS"}}, "node.allowed_calling_aets"),
        ({"node": {"allowed_peers": ["10.0.0.300"]}}, "node.allowed_peers: '10.0.0.300' is not"),
        ({"node": {"tls_cert": "c.pem"}}, "node.tls_cert and node.tls_key"),
        ({"node": {"log_level": "LOUD"}}, "node.log_level"),
        ({"node": {"check_called_aet": 1}}, "node.check_called_aet = 1: expected true/false"),
        ({"series": {"quiet_seconds": 0}}, "series.quiet_seconds"),
        ({"series": {"description_regex": "("}}, "series.description_regex"),
        ({"series": {"modalities": []}}, "series.modalities"),
        ({"ai": {"device": "tpu"}}, "ai.device"),
        ({"ai": {"disease_thresholds": [0.3]}}, "ai.disease_thresholds = [0.3]: expected"),
        ({"ai": {"mirror": "yes"}}, "ai.mirror = 'yes': expected auto, on or off"),
        ({"ai": {"window_overlap": "half"}}, "ai.window_overlap = 'half': expected auto or"),
        ({"ai": {"window_overlap": 0.9}}, "ai.window_overlap = 0.9"),
        ({"ai": {"window_overlap": [0.5]}}, "expected number or string"),
        ({"ai": {"disease_thresholds": [0.3, 1.5]}}, "ai.disease_thresholds = 1.5"),
        ({"ai": {"peripheral_outline_closing_mm": -1.0}}, "ai.peripheral_outline_closing_mm"),
        ({"ai": {"outline_band_mm": -1.0}}, "ai.outline_band_mm"),
        ({"ai": {"outline_contrast_hu": 5000.0}}, "ai.outline_contrast_hu"),
        ({"destinations": [{"name": "p", "ae_title": "X", "host": "h"}]},
         "destinations[p].port is missing"),
        ({"destinations": [{"name": "", "ae_title": "X", "host": "h", "port": "4242"}]},
         "destinations[1].port = '4242': expected integer"),
        ({"destinations": [{"name": "p", "ae_title": "X", "host": " ", "port": 1}]},
         "destinations[p].host is empty"),
        ({"destinations": [{"name": "p", "ae_title": "X", "host": "10.0.0.1:104", "port": 1}]},
         "destinations[p].host = '10.0.0.1:104': expected a host name or IP address alone"),
        ({"destinations": [{"name": "p", "ae_title": "X", "host": "dicom://pacs", "port": 1}]},
         "destinations[p].host = 'dicom://pacs'"),
        ({"destinations": [{"name": "p", "ae_title": "X", "host": "h", "port": 1,
                            "outputs": []}]}, "destinations[p].outputs is empty"),
        ({"export": {"give_up_after_seconds": float("inf")}},
         "export.give_up_after_seconds = inf: expected a finite number"),
        ({"export": {"timeout_seconds": float("nan")}}, "export.timeout_seconds = nan"),
        ({"export": {"retry_initial_seconds": 0}}, "export.retry_initial_seconds = 0.0"),
        ({"node": {"tls_cert": "c.pem", "tls_key": "k.pem"}},
         "node.tls_cert = 'c.pem': no such file"),
        ({"destinations": [{"name": "p", "ae_title": "X", "host": "h", "port": 1,
                            "outputs": ["seg", "movie"]}]}, "destinations[p].outputs: 'movie'"),
        ({"destinations": [{"name": "p", "ae_title": "X", "host": "h", "port": 1}] * 2},
         "names must be unique"),
    ],
)
def test_errors_name_the_key(data: dict, message: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        settings_from_mapping(data, base_dir=Path("/tmp"))
    assert message in str(excinfo.value)


def test_values_are_typed_and_relative_paths_follow_the_file(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text(
        '[node]\nport = 4006\nallowed_calling_aets = ["CT1", "PACS"]\n'
        '[storage]\ndata_dir = "store"\n'
        '[series]\nquiet_seconds = 3\n'
        '[[destinations]]\nname = "pacs"\nae_title = "ORTHANC"\nhost = "pacs.local"\n'
        'port = 4242\noutputs = ["seg", "sr", "pdf"]\n'
    )
    settings = load_settings(config)
    assert settings.node.port == 4006
    assert settings.node.allowed_calling_aets == ["CT1", "PACS"]
    assert settings.series.quiet_seconds == 3.0 and isinstance(settings.series.quiet_seconds, float)
    assert settings.data_dir == tmp_path / "store"
    assert settings.destinations[0].outputs == ["seg", "sr", "pdf"]


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_settings(tmp_path / "absent.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[node\nport = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(bad)


def test_every_key_is_documented() -> None:
    """docs/configuration.md is the reference a PACS admin reads: no key may be missing."""
    import dataclasses

    from dicomnode.config import (
        AIConfig,
        Destination,
        ExportConfig,
        NodeConfig,
        PipelineConfig,
        SeriesConfig,
        StorageConfig,
    )

    doc = (ROOT / "docs" / "configuration.md").read_text()
    for section, cls in [("node", NodeConfig), ("storage", StorageConfig),
                         ("series", SeriesConfig), ("ai", AIConfig),
                         ("pipeline", PipelineConfig), ("export", ExportConfig),
                         ("[destinations]", Destination)]:
        assert f"## [{section}]" in doc
        for item in dataclasses.fields(cls):
            assert f"`{item.name}`" in doc, f"{section}.{item.name} not in docs/configuration.md"
