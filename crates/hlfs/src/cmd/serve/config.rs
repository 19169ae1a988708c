//! `hlfs serve --config FILE`: the serve options in a TOML file, for a
//! server run as a service. Every key stands for one command-line option;
//! an option given on the command line (or in its environment variable)
//! wins over the file. A key the file should not have is an error naming
//! it, so a typo never silently leaves a default in place.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::parser::ValueSource;
use clap::ArgMatches;
use serde::Deserialize;

use super::ServeArgs;
use crate::args::{parse_size, DurabilityArg, GlobalArgs};

/// The file, as `packaging/serve.toml` shows it.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ServeConfig {
    /// VOLUME or VOLUME@SNAPSHOT, as on the command line.
    #[serde(default)]
    volumes: Vec<String>,
    #[serde(default)]
    listen: Listen,
    #[serde(default)]
    tls: Tls,
    #[serde(default)]
    limits: Limits,
    #[serde(default)]
    metrics: Metrics,
    #[serde(default)]
    cache: Cache,
    #[serde(default)]
    store: Store,
    #[serde(default)]
    gc: Gc,
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct Gc {
    target: Option<f64>,
    every: Option<u64>,
    grace: Option<u64>,
    busy_rate: Option<u64>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct Listen {
    tcp: Option<String>,
    socket: Option<PathBuf>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct Tls {
    certs: Option<PathBuf>,
    verify_clients: Option<bool>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct Limits {
    max_connections: Option<usize>,
    max_connections_per_export: Option<usize>,
    handshake_timeout: Option<u64>,
    in_flight: Option<Size>,
    in_flight_total: Option<Size>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct Metrics {
    listen: Option<String>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct Cache {
    dir: Option<PathBuf>,
    size: Option<Size>,
    map_budget: Option<Size>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct Store {
    durability: Option<Durability>,
    timeout: Option<u64>,
    ceph_conf: Option<PathBuf>,
    ceph_id: Option<String>,
    ceph_keyring: Option<PathBuf>,
}

#[derive(Deserialize, Debug, Clone, Copy)]
#[serde(rename_all = "kebab-case")]
enum Durability {
    Local,
    Remote,
}

/// A size: a number of bytes, or text with a binary suffix ("64M").
#[derive(Debug, Clone, Copy, PartialEq)]
struct Size(u64);

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Size, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Size;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a size: bytes, or text such as \"64M\" or \"10G\"")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Size, E> {
                Ok(Size(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Size, E> {
                u64::try_from(v)
                    .map(Size)
                    .map_err(|_| E::custom(format!("a size cannot be negative ({v})")))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Size, E> {
                parse_size(v).map(Size).map_err(E::custom)
            }
        }
        d.deserialize_any(Visitor)
    }
}

impl ServeConfig {
    pub fn parse(text: &str) -> Result<ServeConfig, toml::de::Error> {
        toml::from_str(text)
    }

    pub fn load(path: &Path) -> Result<ServeConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the config file {}", path.display()))?;
        ServeConfig::parse(&text).map_err(|e| {
            // toml's message shows the line and marks the key.
            anyhow::Error::new(hlfs_volume::VolumeError::InvalidArgument(format!(
                "config file {}: {e}",
                path.display()
            )))
        })
    }

    /// Fills every option the user did not give from the file.
    pub fn apply(self, given: &Given, global: &mut GlobalArgs, serve: &mut ServeArgs) {
        fn set<T>(given: &Given, id: &str, target: &mut T, value: Option<T>) {
            if let Some(value) = value {
                if !given.has(id) {
                    *target = value;
                }
            }
        }
        if !given.has("volumes") {
            serve.volumes = self.volumes;
        }
        set(
            given,
            "listen",
            &mut serve.listen,
            self.listen.tcp.map(Some),
        );
        set(
            given,
            "socket",
            &mut serve.socket,
            self.listen.socket.map(Some),
        );
        set(
            given,
            "tls_certs",
            &mut serve.tls_certs,
            self.tls.certs.map(Some),
        );
        set(
            given,
            "tls_verify_clients",
            &mut serve.tls_verify_clients,
            self.tls.verify_clients,
        );
        let limits = self.limits;
        set(
            given,
            "max_connections",
            &mut serve.max_connections,
            limits.max_connections,
        );
        set(
            given,
            "max_connections_per_export",
            &mut serve.max_connections_per_export,
            limits.max_connections_per_export,
        );
        set(
            given,
            "handshake_timeout",
            &mut serve.handshake_timeout,
            limits.handshake_timeout,
        );
        set(
            given,
            "in_flight",
            &mut serve.in_flight,
            limits.in_flight.map(|s| s.0),
        );
        set(
            given,
            "in_flight_total",
            &mut serve.in_flight_total,
            limits.in_flight_total.map(|s| s.0),
        );
        set(
            given,
            "metrics",
            &mut serve.metrics,
            self.metrics.listen.map(Some),
        );
        set(given, "cache_dir", &mut global.cache_dir, self.cache.dir);
        set(
            given,
            "cache_size",
            &mut global.cache_size,
            self.cache.size.map(|s| s.0),
        );
        set(
            given,
            "map_budget",
            &mut global.map_budget,
            self.cache.map_budget.map(|s| s.0),
        );
        set(given, "gc_target", &mut serve.gc_target, self.gc.target);
        set(given, "gc_every", &mut serve.gc_every, self.gc.every);
        set(given, "gc_grace", &mut serve.gc_grace, self.gc.grace);
        set(
            given,
            "gc_busy_rate",
            &mut serve.gc_busy_rate,
            self.gc.busy_rate,
        );
        let store = self.store;
        set(
            given,
            "durability",
            &mut global.durability,
            store.durability.map(|d| match d {
                Durability::Local => DurabilityArg::Local,
                Durability::Remote => DurabilityArg::Remote,
            }),
        );
        set(
            given,
            "store_timeout",
            &mut global.store_timeout,
            store.timeout,
        );
        set(
            given,
            "ceph_conf",
            &mut global.ceph_conf,
            store.ceph_conf.map(Some),
        );
        set(
            given,
            "ceph_id",
            &mut global.ceph_id,
            store.ceph_id.map(Some),
        );
        set(
            given,
            "ceph_keyring",
            &mut global.ceph_keyring,
            store.ceph_keyring.map(Some),
        );
    }
}

/// The options the user gave on the command line or through an
/// environment variable, which the config file does not override.
#[derive(Debug, Default)]
pub struct Given(BTreeSet<String>);

impl Given {
    /// The given options of `matches` and of its subcommands.
    pub fn from_matches(matches: &ArgMatches) -> Given {
        let mut given = BTreeSet::new();
        let mut level = Some(matches);
        while let Some(m) = level {
            for id in m.ids() {
                if matches!(
                    m.value_source(id.as_str()),
                    Some(ValueSource::CommandLine | ValueSource::EnvVariable)
                ) {
                    given.insert(id.as_str().to_string());
                }
            }
            level = m.subcommand().map(|(_, sub)| sub);
        }
        Given(given)
    }

    fn has(&self, id: &str) -> bool {
        self.0.contains(id)
    }
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, FromArgMatches};
    use proptest::prelude::*;

    use super::*;
    use crate::cli::{Cli, Command};

    /// The command line `args` (after `hlfs`) with `config` applied.
    fn configured(args: &[&str], config: &str) -> (GlobalArgs, ServeArgs) {
        let matches = Cli::command()
            .try_get_matches_from(["hlfs"].iter().chain(args))
            .unwrap();
        let cli = Cli::from_arg_matches(&matches).unwrap();
        let Command::Serve(mut serve) = cli.command else {
            panic!("not serve")
        };
        let mut global = cli.global;
        ServeConfig::parse(config).unwrap().apply(
            &Given::from_matches(&matches),
            &mut global,
            &mut serve,
        );
        (global, serve)
    }

    /// The packaged example with its commented-out keys given.
    fn example_with_every_key() -> String {
        include_str!("../../../../../packaging/serve.toml")
            .lines()
            .map(|line| match line.strip_prefix("# ") {
                // `# key = value   # comment`: a key left out.
                Some(key) if key.split_whitespace().nth(1) == Some("=") => key,
                _ => line,
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn the_packaged_example_parses_as_it_is() {
        let example = include_str!("../../../../../packaging/serve.toml");
        let (_, serve) = configured(&["serve"], example);
        assert_eq!(serve.volumes.len(), 2);
        // Left for socket activation and a certificate directory to give.
        assert_eq!(
            (serve.listen, serve.socket, serve.tls_certs),
            (None, None, None)
        );
    }

    #[test]
    fn the_packaged_example_sets_every_option() {
        let example = example_with_every_key();
        let (global, serve) = configured(&["serve"], &example);
        assert_eq!(
            serve.volumes,
            ["/var/lib/hlfs/vm1", "/var/lib/hlfs/base@golden"]
        );
        assert_eq!(serve.listen.as_deref(), Some("127.0.0.1:10809"));
        assert_eq!(serve.socket, Some(PathBuf::from("/run/hlfs/nbd.sock")));
        assert_eq!(serve.tls_certs, Some(PathBuf::from("/etc/hlfs/tls")));
        assert!(serve.tls_verify_clients);
        assert_eq!(serve.max_connections, 256);
        assert_eq!(serve.max_connections_per_export, 16);
        assert_eq!(serve.handshake_timeout, 10);
        assert_eq!(serve.in_flight, 64 << 20);
        assert_eq!(serve.in_flight_total, 256 << 20);
        assert_eq!(serve.metrics.as_deref(), Some("9810"));
        assert_eq!(global.cache_dir, PathBuf::from("/var/cache/hlfs"));
        assert_eq!(global.cache_size, 10 << 30);
        assert_eq!(global.map_budget, 512 << 20);
        assert!(matches!(global.durability, DurabilityArg::Local));
        assert_eq!(global.store_timeout, 30);
        assert_eq!(global.ceph_id.as_deref(), Some("hlfs"));
        assert_eq!(global.ceph_conf, Some(PathBuf::from("/etc/ceph/ceph.conf")));
        assert_eq!(
            (
                serve.gc_target,
                serve.gc_every,
                serve.gc_grace,
                serve.gc_busy_rate
            ),
            (1.4, 300, 120, 16)
        );
    }

    #[test]
    fn options_given_on_the_command_line_win_over_the_file() {
        let file = r#"
            volumes = ["a", "b"]
            [listen]
            socket = "/file.sock"
            [limits]
            in-flight = 50000000
            max-connections = 7
            [cache]
            map-budget = "1G"
            size = "2G"
            [store]
            durability = "remote"
            ceph-id = "file"
        "#;
        let (global, serve) = configured(
            &[
                "--map-budget",
                "64M",
                "serve",
                "c",
                "--socket",
                "/flag.sock",
                "--max-connections",
                "9",
                "--ceph-id",
                "flag",
            ],
            file,
        );
        assert_eq!(serve.volumes, ["c"]);
        assert_eq!(serve.socket, Some(PathBuf::from("/flag.sock")));
        assert_eq!(serve.max_connections, 9);
        assert_eq!(global.map_budget, 64 << 20);
        assert_eq!(global.ceph_id.as_deref(), Some("flag"));
        // Not given on the command line: from the file.
        assert_eq!(serve.in_flight, 50_000_000);
        assert_eq!(global.cache_size, 2 << 30);
        assert!(matches!(global.durability, DurabilityArg::Remote));
    }

    #[test]
    fn a_misspelt_or_misplaced_key_is_an_error_naming_it() {
        for (text, key) in [
            ("volume = [\"a\"]", "volume"),
            ("[limits]\nmax-conections = 3", "max-conections"),
            ("[cache]\ndurability = \"local\"", "durability"),
            ("[nbd]\nport = 1", "nbd"),
        ] {
            let e = ServeConfig::parse(text).unwrap_err().to_string();
            assert!(e.contains(&format!("unknown field `{key}`")), "{text}: {e}");
        }
        for (text, says) in [
            ("[limits]\nin-flight = \"lots\"", "is not a size"),
            ("[limits]\nin-flight = -1", "cannot be negative"),
            ("[store]\ndurability = \"sometimes\"", "unknown variant"),
            ("volumes = \"a\"", "invalid type"),
        ] {
            let e = ServeConfig::parse(text).unwrap_err().to_string();
            assert!(e.contains(says), "{text}: {e}");
        }
    }

    proptest! {
        /// Garbage, and the example with bytes changed, cut or repeated, is
        /// parsed or refused with an error, never a panic.
        #[test]
        fn any_text_is_parsed_or_refused(
            junk in ".{0,200}",
            at in 0usize..4096,
            bytes in proptest::collection::vec(any::<u8>(), 0..8),
        ) {
            let _ = ServeConfig::parse(&junk);
            let example = include_str!("../../../../../packaging/serve.toml").as_bytes();
            let at = at % example.len();
            let mut mutated = example[..at].to_vec();
            mutated.extend(&bytes);
            mutated.extend(&example[(at + bytes.len()).min(example.len())..]);
            let _ = ServeConfig::parse(&String::from_utf8_lossy(&mutated));
            let _ = ServeConfig::parse(&String::from_utf8_lossy(&example[..at]));
        }
    }
}
