//! The bans file's JSON within its size bound (`examples/mqtt-gateway/bans_json.rs`,
//! compiled here as it is in the gateway).

#[path = "../mqtt-gateway/bans_json.rs"]
mod bans_json;

use std::time::Duration;

use aegis_mqtt::security::{Ban, BanKey, Security};

use bans_json::encode;

/// Bans whose names are control characters take six bytes a character in JSON: a
/// file of them could outgrow what the next start reads back. The writer keeps the
/// bans that end last, within the bound, and the file stays a list of bans.
#[test]
fn the_file_keeps_the_bans_that_end_last_within_its_bound() {
    let sec = Security::default();
    for i in 0..10_u64 {
        let name = format!("{i}{}", "\u{1}".repeat(40));
        sec.ban(BanKey::Username(name.into()), Duration::from_secs(600 + i));
    }
    let bans = sec.bans();
    let (all, left_out) = encode(&bans, usize::MAX).unwrap();
    assert_eq!(left_out, 0);
    assert_eq!(serde_json::from_slice::<Vec<Ban>>(&all).unwrap().len(), 10);
    let max = all.len() / 2;
    let (json, left_out) = encode(&bans, max).unwrap();
    assert!(json.len() <= max, "{} > {max}", json.len());
    let kept: Vec<Ban> = serde_json::from_slice(&json).unwrap();
    assert_eq!(kept.len() + left_out, 10);
    assert!((4..=5).contains(&kept.len()), "{} kept", kept.len());
    // The ones that end last (`bans` lists the soonest-ending first), in order.
    let keys = |bans: &[Ban]| bans.iter().map(|b| b.key.clone()).collect::<Vec<_>>();
    assert_eq!(keys(&kept), keys(&bans[left_out..]));
    // Exactly at the bound, all fit; one byte less, one is left out.
    assert_eq!(encode(&bans, all.len()).unwrap().1, 0);
    assert_eq!(encode(&bans, all.len() - 1).unwrap().1, 1);
}
