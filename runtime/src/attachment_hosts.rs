//! Which hosts Switchboard fetches attachment references from (SendReply's check in the API,
//! the email transport of the delivery service). An agent — or anyone holding an API key —
//! chooses the URL, so by default only public addresses are fetched: a reference to
//! `http://127.0.0.1:…`, `http://10.…`, a cloud metadata address or a name resolving to one of
//! them is refused before any connection is made (server-side request forgery). Local stand-ins
//! in tests and the demo need `AttachmentHosts::AnyAddress`.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use reqwest::dns::{Addrs, Name, Resolve, Resolving};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachmentHosts {
    /// Public unicast addresses only (the default).
    PublicOnly,
    /// Any address, loopback and private ranges included (tests, demos, a private network of
    /// trusted hosts).
    AnyAddress,
}

impl AttachmentHosts {
    pub fn from_allow_private(allow_private: bool) -> Self {
        if allow_private { AttachmentHosts::AnyAddress } else { AttachmentHosts::PublicOnly }
    }
}

/// True for addresses a fetch may reach under [`AttachmentHosts::PublicOnly`]: not loopback,
/// private (RFC 1918, unique-local), link-local (metadata services), shared (CGNAT),
/// unspecified, broadcast, multicast, documentation or benchmarking ranges. IPv4-mapped IPv6
/// addresses are judged as the IPv4 address they carry.
pub fn is_public(address: IpAddr) -> bool {
    match address {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || a == 0
                || (a == 100 && (64..128).contains(&b))
                || (a == 198 && (b == 18 || b == 19))
                || a >= 240)
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let first = v6.segments()[0];
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80
                || first == 0x2001 && v6.segments()[1] == 0x0db8)
        }
    }
}

/// Why a URL may not be fetched, or `None` when its host is a name (judged when resolved) or a
/// permitted address literal.
pub fn refusal_of_url(url: &reqwest::Url, hosts: AttachmentHosts) -> Option<String> {
    if hosts == AttachmentHosts::AnyAddress {
        return None;
    }
    let address = match url.host()? {
        url::Host::Domain(_) => return None,
        url::Host::Ipv4(v4) => IpAddr::V4(v4),
        url::Host::Ipv6(v6) => IpAddr::V6(v6),
    };
    (!is_public(address)).then(|| format!("{address} is not a public address"))
}

/// A reqwest client builder that enforces `hosts` on every connection: names are resolved
/// and non-public addresses dropped (a name with nothing else left fails to resolve), address
/// literals are checked before the request and at every redirect.
pub fn client_builder(hosts: AttachmentHosts) -> reqwest::ClientBuilder {
    let builder = reqwest::Client::builder();
    if hosts == AttachmentHosts::AnyAddress {
        return builder;
    }
    builder.dns_resolver(Arc::new(PublicOnlyResolver)).redirect(reqwest::redirect::Policy::custom(|attempt| {
        if attempt.previous().len() >= 5 {
            attempt.error("more than 5 redirects")
        } else if let Some(refusal) = refusal_of_url(attempt.url(), AttachmentHosts::PublicOnly) {
            attempt.error(format!("redirected to a refused address: {refusal}"))
        } else {
            attempt.follow()
        }
    }))
}

/// The refusal behind a failed request, when the resolver refused the host (the error's
/// innermost cause names it).
pub fn refusal_in(error: &reqwest::Error) -> Option<String> {
    let mut cause: &dyn std::error::Error = error;
    while let Some(source) = cause.source() {
        cause = source;
    }
    let text = cause.to_string();
    text.ends_with(NO_PUBLIC_ADDRESS).then_some(text)
}

const NO_PUBLIC_ADDRESS: &str = "resolves to no public address";

struct PublicOnlyResolver;

impl Resolve for PublicOnlyResolver {
    fn resolve(&self, name: Name) -> Resolving {
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let resolved: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let public: Vec<SocketAddr> = resolved.into_iter().filter(|address| is_public(address.ip())).collect();
            if public.is_empty() {
                let refusal = format!("{host} {NO_PUBLIC_ADDRESS}");
                return Err(Box::<dyn std::error::Error + Send + Sync>::from(refusal));
            }
            Ok(Box::new(public.into_iter()) as Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_loopback_link_local_and_shared_addresses_are_not_public() {
        for refused in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
        ] {
            assert!(!is_public(refused.parse().unwrap()), "{refused} must be refused");
        }
        for allowed in ["93.184.216.34", "8.8.8.8", "2606:4700::1111", "::ffff:8.8.8.8"] {
            assert!(is_public(allowed.parse().unwrap()), "{allowed} must be allowed");
        }
    }

    #[test]
    fn address_literals_in_urls_are_judged_names_are_left_to_the_resolver() {
        let url = |text: &str| reqwest::Url::parse(text).unwrap();
        assert!(refusal_of_url(&url("http://169.254.169.254/latest/meta-data"), AttachmentHosts::PublicOnly).is_some());
        assert!(refusal_of_url(&url("http://[::1]:8080/a.pdf"), AttachmentHosts::PublicOnly).is_some());
        assert!(refusal_of_url(&url("https://files.example/a.pdf"), AttachmentHosts::PublicOnly).is_none());
        assert!(refusal_of_url(&url("http://127.0.0.1:9/a.pdf"), AttachmentHosts::AnyAddress).is_none());
    }

    #[tokio::test]
    async fn a_name_resolving_only_to_loopback_is_refused_before_connecting() {
        let client = client_builder(AttachmentHosts::PublicOnly).build().unwrap();
        let error = client.head("http://localhost:9/a.pdf").send().await.unwrap_err();
        assert_eq!(refusal_in(&error).as_deref(), Some("localhost resolves to no public address"), "{error:?}");
    }
}
