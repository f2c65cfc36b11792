#![allow(clippy::unwrap_used)]
//! Against the real kernel, in a network namespace of the test's own.

use super::testing::{in_new_netns, veth_pair};
use super::*;

/// What the guest will do with the host's values: addresses, MTU and
/// routes applied to a link read back as they were given, the route's
/// own MTU and source included.
#[test]
fn applied_addresses_and_routes_read_back_as_given() {
    in_new_netns(|| {
        let mut rtnl = Rtnl::open().unwrap();
        veth_pair(&mut rtnl, "kbt-r0", "kbt-r1").unwrap();
        let index = link_index(&mut rtnl, "kbt-r0").unwrap();
        set_up(&mut rtnl, index, Some(1450)).unwrap();
        let v4: IpAddr = "10.89.0.2".parse().unwrap();
        let v6: IpAddr = "fd00:89::2".parse().unwrap();
        add_address(&mut rtnl, index, v4, 24).unwrap();
        add_address(&mut rtnl, index, v6, 64).unwrap();
        let default = Route {
            destination: None,
            gateway: Some("10.89.0.1".parse().unwrap()),
            source: Some(v4),
            device: Some(index),
            mtu: Some(1300),
        };
        add_route(&mut rtnl, &default).unwrap();
        let service = Route {
            destination: Some(("10.96.0.0".parse().unwrap(), 12)),
            gateway: None,
            source: None,
            device: Some(index),
            mtu: None,
        };
        add_route(&mut rtnl, &service).unwrap();

        let interface = interfaces(&mut rtnl)
            .unwrap()
            .into_iter()
            .find(|i| i.index == index)
            .unwrap();
        assert_eq!(
            (interface.kind.clone(), interface.mtu),
            (LinkKind::Veth, 1450)
        );
        assert!(interface.addresses.contains(&(v4, 24)), "{interface:?}");
        assert!(interface.addresses.contains(&(v6, 64)), "{interface:?}");
        let routes = routes(&mut rtnl).unwrap();
        assert!(routes.contains(&default), "{routes:?}");
        assert!(routes.contains(&service), "{routes:?}");
        // The kernel's own route for the address's subnet.
        assert!(routes
            .iter()
            .any(|r| r.destination == Some(("10.89.0.0".parse().unwrap(), 24))));
    });
}

#[test]
fn bad_values_are_refused_naming_what_was_applied() {
    in_new_netns(|| {
        let mut rtnl = Rtnl::open().unwrap();
        assert!(matches!(
            link_index(&mut rtnl, "kbt-none"),
            Err(NetlinkError::NoSuchInterface(_))
        ));
        veth_pair(&mut rtnl, "kbt-b0", "kbt-b1").unwrap();
        let index = link_index(&mut rtnl, "kbt-b0").unwrap();
        set_up(&mut rtnl, index, None).unwrap();
        // An MTU the device cannot take.
        let err = set_up(&mut rtnl, index, Some(70_000)).unwrap_err();
        assert!(err.to_string().contains(&format!("link {index}")), "{err}");
        // A gateway that is not reachable on any link.
        let unreachable = Route {
            destination: None,
            gateway: Some("192.0.2.1".parse().unwrap()),
            source: None,
            device: Some(index),
            mtu: None,
        };
        let err = add_route(&mut rtnl, &unreachable).unwrap_err();
        assert!(err.to_string().contains("default via 192.0.2.1"), "{err}");
    });
}
