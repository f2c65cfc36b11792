use super::env::{expand, expand_literal};
use super::process::{capabilities, image_user};
use super::*;

#[test]
fn expansion_follows_kubernetes() {
    let vars: BTreeMap<String, Option<String>> = [
        ("A".to_string(), Some("x.y".to_string())),
        ("S".to_string(), None),
    ]
    .into_iter()
    .collect();
    assert_eq!(expand("$(A)-$(S)", &vars), "x\\.y\\-.*");
    assert_eq!(expand("$$(A)", &vars), "\\$\\(A\\)");
    assert_eq!(expand("$(UNSET) $", &vars), "\\$\\(UNSET\\) \\$");
    assert_eq!(
        expand_literal("$(A)/$$(A)/$(UNSET)", &vars).as_deref(),
        Some("x.y/$(A)/$(UNSET)")
    );
    assert_eq!(expand_literal("$(S)", &vars), None);
}

#[test]
fn image_users() {
    assert_eq!(image_user(None), (Some(0), Some(0)));
    assert_eq!(image_user(Some("10:20")), (Some(10), Some(20)));
    assert_eq!(image_user(Some("10")), (Some(10), None));
    assert_eq!(image_user(Some("nginx")), (None, None));
}

#[test]
fn capabilities_follow_the_security_context() {
    let s = Settings::default();
    let sc = |add: &[&str], drop: &[&str]| SecurityContext {
        capabilities: Some(crate::manifest::Capabilities {
            add: add.iter().map(|x| x.to_string()).collect(),
            drop: drop.iter().map(|x| x.to_string()).collect(),
        }),
        ..Default::default()
    };
    let caps = capabilities(&s, Some(&sc(&["NET_ADMIN"], &["ALL"]))).expect("some");
    assert_eq!(caps, vec!["CAP_NET_ADMIN".to_string()]);
    let caps = capabilities(&s, Some(&sc(&[], &["chown"]))).expect("some");
    assert!(!caps.contains(&"CAP_CHOWN".to_string()));
    assert_eq!(caps.len(), s.default_capabilities.len() - 1);
    assert_eq!(capabilities(&s, Some(&sc(&["ALL"], &[]))), None);
}
