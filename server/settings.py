"""Server settings: one object, read once in the entry point and injected everywhere.

Every field reads K5SERVE_<FIELD> from the environment; CLI flags (server/cli.py) override it.
List fields take comma-separated values (K5SERVE_API_KEY=a,b  K5SERVE_MODELS=x,y).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def _split_commas(value: object) -> object:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="K5SERVE_", populate_by_name=True, extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    weights_dir: Path = Path("weights")
    data_dir: Path = Path("data")
    device: str = "auto"  # one device; --devices (below) wins when given
    # The workers, one per device or group (server/devices.py): auto | all | cuda:0,cuda:2 | cpu,cpu;
    # a `+` joins devices into one sequence-parallel group. None: --device as a one-device list.
    devices: str | None = None
    sp_degree: int = Field(1, ge=1)  # group consecutive devices in runs of N (one video across N devices)
    models: Annotated[list[str] | None, NoDecode] = None
    # K5SERVE_API_KEY (the flag is --api-key, repeatable); K5SERVE_API_KEYS also works.
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, validation_alias=AliasChoices("api_keys", "K5SERVE_API_KEY", "K5SERVE_API_KEYS")
    )
    public_url: str | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    max_queue: int = Field(100, ge=1)
    fal_run_port: int | None = Field(None, ge=0, le=65535)
    require_weights: bool = False
    # Where the weights live on the GPU (pipelines/memory.py): auto decides per variant from the device memory.
    memory_mode: Literal["auto", "gpu", "offload_text", "stream_text", "offload_model", "stream"] = "auto"
    # Opt-in approximate weight storage (pipelines/quant.py; labelled in every job made with it).
    text_encoder_int8: bool = False
    fp8_weights: bool = False
    # Opt-in fp8 matmuls in the transformer blocks (pipelines/fp8_compute.py): CUDA sm_89+ only, the
    # worker refuses to start without it. Approximate and labelled, like the storage modes above.
    fp8_compute: bool = False
    # GiB of host RAM the memory plan may fill with offloaded/streamed weights (default: detected on CUDA).
    host_memory: float | None = Field(None, gt=0)
    # GiB of device memory the engine may use (default: what the GPU reports; none on the CPU): less
    # leaves room for other processes; on the CPU it sets a budget, so eviction can be exercised there.
    device_memory: float | None = Field(None, gt=0)
    # torch.compile of the repeated transformer blocks: auto = on for CUDA (warmed at start-up), off on the CPU.
    compile: Literal["auto", "on", "off"] = "auto"
    # Rewrite each prompt with Qwen2.5-VL before encoding, as the official pipelines do by default
    # (pipelines/expand.py). Off: the exact diffusers pipeline. A request's own switch wins.
    expand_prompts: bool = False
    # Join this Ray cluster and run the workers as Ray actors on its GPUs ("auto": the cluster
    # `ray start` made on this host; needs the ray extra). None: no Ray (docs/scale-out.md).
    ray_address: str | None = None

    # Not CLI flags: tuning knobs with safe defaults (still settable through K5SERVE_*).
    webhook_timeout: float = Field(15.0, gt=0)  # fal delivery policy: 15 s per attempt
    webhook_max_attempts: int = Field(10, ge=1)
    webhook_backoff: float = Field(2.0, gt=0)  # first retry delay, doubled each time
    webhook_max_backoff: float = Field(900.0, gt=0)
    image_fetch_timeout: float = Field(15.0, gt=0)
    image_max_bytes: int = Field(20 * 1024 * 1024, ge=1024)
    sse_keepalive: float = Field(15.0, gt=0)  # fal: "a comment line every 15 seconds"
    # A job whose runs killed this many worker processes fails instead of running again (poison job).
    worker_max_deaths: int = Field(2, ge=1)
    # What a worker process calls to build its engine, "module:function(devices, **engine_options)".
    engine_factory: str = "server.worker_main:build_engine"

    # Input limits (issue 5): each answers the contract's own 4xx when exceeded.
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024)  # any request body (JSON or multipart)
    max_prompt_chars: int = Field(4000, ge=1)  # prompt and negative_prompt, each
    image_max_pixels: int = Field(40_000_000, ge=1)  # width x height of an input image (decompression bombs)
    data_uri_max_bytes: int = Field(20 * 1024 * 1024, ge=1024)  # decoded size of a data: URI image
    # Outbound URLs (image_url fetches, webhooks): loopback, private, link-local and metadata addresses
    # are refused unless listed here (IP addresses, CIDR blocks or host names), e.g. an on-prem image store.
    url_allowlist: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Retention: outputs and their job records expire together this long after the job ended (0: keep).
    retention_hours: float = Field(0.0, ge=0)
    # Other servers' model names -> variants, K5SERVE_MODEL_ALIASES=name=variant,... (docs/sora.md), over
    # the default table (variants.DEFAULT_ALIASES: Sora's names); every contract takes them as model ids.
    model_aliases: Annotated[dict[str, str], NoDecode] = Field(default_factory=dict)

    @field_validator("models", "api_keys", "url_allowlist", mode="before")
    @classmethod
    def _comma_lists(cls, value: object) -> object:
        return _split_commas(value)

    @field_validator("model_aliases", mode="before")
    @classmethod
    def _parse_aliases(cls, value: object) -> object:
        from pipelines.variants import parse_aliases

        if isinstance(value, str):
            return parse_aliases(value)
        if isinstance(value, dict):  # given as a mapping (tests, create_app callers): checked the same way
            return parse_aliases(",".join(f"{k}={v}" for k, v in value.items()))
        return value

    @property
    def aliases(self) -> dict[str, str]:
        """Every model alias in force: the default table, then K5SERVE_MODEL_ALIASES over it."""
        from pipelines.variants import DEFAULT_ALIASES

        return {**DEFAULT_ALIASES, **self.model_aliases}

    @field_validator("models")
    @classmethod
    def _empty_models_means_all(cls, value: list[str] | None) -> list[str] | None:
        return value or None

    @field_validator("url_allowlist")
    @classmethod
    def _check_allowlist(cls, value: list[str]) -> list[str]:
        from .netguard import Allowlist

        Allowlist(value)  # a ValueError names the entry that is not an address, a CIDR block or a name
        return value

    @field_validator("ray_address")
    @classmethod
    def _blank_ray_address(cls, value: str | None) -> str | None:
        return value.strip() or None if value is not None else None

    @field_validator("public_url")
    @classmethod
    def _check_public_url(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"public_url must be an absolute http(s) URL, got {value!r}")
        return value.rstrip("/")

    @field_validator("api_keys")
    @classmethod
    def _check_keys(cls, value: list[str]) -> list[str]:
        for key in value:
            if any(ch.isspace() for ch in key):
                raise ValueError("an API key must not contain whitespace")
        return value

    @model_validator(mode="after")
    def _check_tls(self) -> Settings:
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("give both ssl_certfile and ssl_keyfile, or neither")
        for path in (self.ssl_certfile, self.ssl_keyfile):
            if path is not None and not path.is_file():
                raise ValueError(f"TLS file {str(path)!r} does not exist")
        if self.fal_run_port is not None and self.fal_run_port == self.port and self.port != 0:
            raise ValueError(f"fal_run_port must differ from port (both are {self.port})")
        return self

    def engine_options(self) -> dict:
        """The engine's keyword arguments besides its device (pipelines.engine.Engine), as plain
        data: they travel to the process or Ray actor that builds the engine."""
        return {
            "weights_dir": str(self.weights_dir),
            "models": self.models,
            "require_weights": self.require_weights,
            "memory_mode": self.memory_mode,
            "host_memory": int(self.host_memory * 2**30) if self.host_memory else None,
            "device_memory": int(self.device_memory * 2**30) if self.device_memory else None,
            "text_encoder_int8": self.text_encoder_int8,
            "fp8_weights": self.fp8_weights,
            "fp8_compute": self.fp8_compute,
            "compile": {"auto": None, "on": True, "off": False}[self.compile],
        }

    @property
    def tls(self) -> bool:
        return self.ssl_certfile is not None
