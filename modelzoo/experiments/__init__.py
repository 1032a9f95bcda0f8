"""Named experiments (`conf/experiment/`): what a sweep pre-trains and which downstream stages follow."""
