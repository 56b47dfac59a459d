//! `[tracing]`: span export over OTLP/HTTP (docs/config.md, `[tracing]`).

use std::collections::BTreeMap;

use serde::Deserialize;

use super::ConfigError;

/// Default `service.name` of the exported spans.
pub const DEFAULT_SERVICE_NAME: &str = "meshnode";
/// Default share of new traces recorded: every one, as a user who adds the section expects to
/// see their requests; lower it on busy meshes.
pub const DEFAULT_SAMPLE_RATIO: f64 = 1.0;
/// Longest `service_name`: a resource attribute, not a document.
const MAX_SERVICE_NAME: usize = 255;
/// Most `headers` entries: authentication and tenancy need one or two.
const MAX_HEADERS: usize = 32;

/// `[tracing]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TracingConfig {
    /// Base URL of the OTLP/HTTP receiver, e.g. `http://127.0.0.1:4318`; spans are POSTed to
    /// `{otlp_endpoint}/v1/traces`.
    pub otlp_endpoint: String,
    /// Share of new traces recorded, 0.0–1.0. Parent-based: a request that arrives with a
    /// sampled `traceparent` is always recorded, one with an unsampled one never.
    #[serde(default = "default_ratio")]
    pub sample_ratio: f64,
    /// The `service.name` resource attribute.
    #[serde(default = "default_service_name")]
    pub service_name: String,
    /// Extra HTTP headers on every export request (authentication, tenant).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

fn default_ratio() -> f64 {
    DEFAULT_SAMPLE_RATIO
}
fn default_service_name() -> String {
    DEFAULT_SERVICE_NAME.into()
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        path: None,
        field: field.into(),
        reason: reason.into(),
    }
}

impl TracingConfig {
    /// The URL spans are POSTed to.
    pub fn traces_url(&self) -> String {
        format!("{}/v1/traces", self.otlp_endpoint.trim_end_matches('/'))
    }

    /// Checks every rule the types alone cannot express; errors name the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let e = &self.otlp_endpoint;
        let uri: http::Uri = e.parse().map_err(|_| {
            invalid(
                "tracing.otlp_endpoint",
                format!("{e:?} is not a URL such as \"http://127.0.0.1:4318\""),
            )
        })?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => {
                return Err(invalid(
                    "tracing.otlp_endpoint",
                    format!(
                        "{e:?}: https is not supported; export to a collector on this host or \
                         network over http (e.g. an OpenTelemetry Collector that forwards with TLS)"
                    ),
                ))
            }
            _ => {
                return Err(invalid(
                    "tracing.otlp_endpoint",
                    format!("{e:?} must start with http://, e.g. \"http://127.0.0.1:4318\""),
                ))
            }
        }
        if uri.host().is_none_or(str::is_empty) || uri.query().is_some() {
            return Err(invalid(
                "tracing.otlp_endpoint",
                format!("{e:?} needs a host and no query, e.g. \"http://127.0.0.1:4318\""),
            ));
        }
        if self.traces_url().parse::<http::Uri>().is_err() {
            return Err(invalid(
                "tracing.otlp_endpoint",
                format!("{e:?} is not a URL"),
            ));
        }
        if !(0.0..=1.0).contains(&self.sample_ratio) {
            return Err(invalid(
                "tracing.sample_ratio",
                format!("must be between 0.0 and 1.0 (got {})", self.sample_ratio),
            ));
        }
        let name = &self.service_name;
        if name.trim().is_empty() || name.len() > MAX_SERVICE_NAME {
            return Err(invalid(
                "tracing.service_name",
                format!("must be 1-{MAX_SERVICE_NAME} characters"),
            ));
        }
        if self.headers.len() > MAX_HEADERS {
            return Err(invalid(
                "tracing.headers",
                format!("at most {MAX_HEADERS} headers"),
            ));
        }
        for (k, v) in &self.headers {
            let field = format!("tracing.headers.{k}");
            if http::HeaderName::from_bytes(k.as_bytes()).is_err() {
                return Err(invalid(field, "is not a valid HTTP header name"));
            }
            if matches!(
                k.to_ascii_lowercase().as_str(),
                "content-type" | "content-length" | "host" | "connection" | "transfer-encoding"
            ) {
                return Err(invalid(field, "is set by the exporter itself"));
            }
            if http::HeaderValue::from_str(v).is_err() {
                return Err(invalid(
                    field,
                    "value must be visible ASCII (no line breaks or control characters)",
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    const BASE: &str = r#"
[node]
name = "node-a"
listen = "127.0.0.1:4433"
state_dir = "/tmp/x"
[tls]
ca = "ca.pem"
cert = "node-a.pem"
key = "node-a.key"
"#;

    fn parse(extra: &str) -> Result<Config, String> {
        Config::parse(&format!("{BASE}[tracing]\n{extra}\n")).map_err(|e| e.to_string())
    }

    #[test]
    fn absent_section_means_no_tracing_and_defaults_apply_when_present() {
        assert!(Config::parse(BASE).expect("valid").tracing.is_none());
        let cfg = parse("otlp_endpoint = \"http://127.0.0.1:4318/\"").expect("valid");
        let t = cfg.tracing.expect("section");
        assert_eq!(t.sample_ratio, 1.0);
        assert_eq!(t.service_name, "meshnode");
        assert!(t.headers.is_empty());
        assert_eq!(t.traces_url(), "http://127.0.0.1:4318/v1/traces");
        let cfg = parse(
            "otlp_endpoint = \"http://collector:4318/otlp\"\nsample_ratio = 0.01\n\
             service_name = \"mesh-eu\"\nheaders = { authorization = \"Bearer x\" }",
        )
        .expect("valid");
        let t = cfg.tracing.expect("section");
        assert_eq!(t.traces_url(), "http://collector:4318/otlp/v1/traces");
        assert_eq!(t.headers["authorization"], "Bearer x");
    }

    #[test]
    fn bad_values_name_the_field() {
        for (extra, field) in [
            (
                "otlp_endpoint = \"127.0.0.1:4318\"",
                "tracing.otlp_endpoint",
            ),
            (
                "otlp_endpoint = \"https://c:4318\"",
                "tracing.otlp_endpoint",
            ),
            (
                "otlp_endpoint = \"http://c:4318?x=1\"",
                "tracing.otlp_endpoint",
            ),
            ("otlp_endpoint = \"not a url\"", "tracing.otlp_endpoint"),
            (
                "otlp_endpoint = \"http://c:4318\"\nsample_ratio = 1.5",
                "tracing.sample_ratio",
            ),
            (
                "otlp_endpoint = \"http://c:4318\"\nsample_ratio = -0.1",
                "tracing.sample_ratio",
            ),
            (
                "otlp_endpoint = \"http://c:4318\"\nservice_name = \"\"",
                "tracing.service_name",
            ),
            (
                "otlp_endpoint = \"http://c:4318\"\nheaders = { \"bad name\" = \"1\" }",
                "tracing.headers.bad name",
            ),
            (
                "otlp_endpoint = \"http://c:4318\"\nheaders = { x-a = \"a\\nb\" }",
                "tracing.headers.x-a",
            ),
            (
                "otlp_endpoint = \"http://c:4318\"\nheaders = { Content-Type = \"x\" }",
                "tracing.headers.Content-Type",
            ),
        ] {
            let e = parse(extra).expect_err(extra);
            assert!(e.contains(field), "{extra}: {e}");
        }
        let e = parse("otlp_endpoint = \"http://c:4318\"\nratio = 1").expect_err("unknown");
        assert!(e.contains("ratio"), "{e}");
        let e = parse("sample_ratio = 1.0").expect_err("missing");
        assert!(e.contains("otlp_endpoint"), "{e}");
    }
}
