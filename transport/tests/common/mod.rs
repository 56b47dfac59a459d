//! Set-up shared by the transport integration tests that run real endpoints on loopback.

use anyhow::Result;
use meshnode_transport::pki::Ca;
use meshnode_transport::{EndpointOptions, Identity, MeshEndpoint, TransportConfig};

/// A node identity `name` issued by `ca`, valid one day.
pub fn identity(ca: &Ca, name: &str) -> Result<Identity> {
    let issued = ca.issue(name, 1)?;
    Ok(Identity::from_pem(
        ca.cert_pem(),
        &issued.cert_pem,
        &issued.key_pem,
    )?)
}

/// An endpoint on a free loopback port with the default transport settings.
#[allow(dead_code)] // Not every test binary uses every helper.
pub fn endpoint(id: Identity) -> Result<MeshEndpoint> {
    endpoint_with(id, TransportConfig::default())
}

/// An endpoint on a free loopback port with `transport`.
#[allow(dead_code)] // Not every test binary uses every helper.
pub fn endpoint_with(id: Identity, transport: TransportConfig) -> Result<MeshEndpoint> {
    let opts = EndpointOptions {
        listen: "127.0.0.1:0".parse()?,
        state_dir: None,
        transport,
    };
    Ok(MeshEndpoint::bind(&opts, id)?)
}
