//! The hasher of the router's in-memory maps: rustc's Fx hash (`rustc-hash`).
//!
//! The router looks strings and ids up several times per decision. SipHash's DoS resistance
//! buys nothing here (keys come from the router's own log) and would cost a large share of
//! `decide`'s time. Fx is seedless, but no decision, event or snapshot may depend on a map's
//! iteration order all the same: the hasher is an implementation detail that can change.

use std::collections::{HashMap, HashSet};

pub use rustc_hash::FxBuildHasher as FastBuildHasher;

pub type FastMap<K, V> = HashMap<K, V, FastBuildHasher>;
pub type FastSet<K> = HashSet<K, FastBuildHasher>;
