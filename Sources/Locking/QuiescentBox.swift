/// A reference read without any lock or atomic, replaced only while no reader can be
/// reading it: the caller of `replace` guarantees that quiescence (a trace module replaces
/// its plan only while it is not enabled and every hit in flight has drained).
public final class QuiescentBox<Value: AnyObject & Sendable>: @unchecked Sendable {
    // SAFETY: `value` is written only by `replace`, whose callers exclude every reader and
    // every other writer first (their own protocol, documented where they call it); readers
    // then see the new reference after the synchronisation that let them start (an atomic
    // load of the owner's state). The per-access exclusivity check is off because that
    // protocol, not the check, is what keeps accesses apart.
    @exclusivity(unchecked) private var value: Value

    public init(_ value: Value) { self.value = value }

    /// The current reference.
    @inline(__always) public var current: Value { value }

    /// Replaces the reference. Only with no reader in flight (see the type).
    public func replace(_ new: Value) { value = new }
}
